"""Running a conversion from its stored bits: kernels (`kernels`, pure tensor functions) and the modules the loaders
build by default (`modules.PackedLinear`, `modules.PackedMatrix`)."""

from .modules import KERNELS, PackedLinear, PackedMatrix

__all__ = ["KERNELS", "PackedLinear", "PackedMatrix"]
