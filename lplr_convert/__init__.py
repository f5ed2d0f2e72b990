"""lplr-convert: compress Hugging Face checkpoints with low-rank, low-precision factorizations."""

__version__ = "0.1.0"

from .errors import IncompleteOutputError, LplrError
from .hf import _hook as _hf_hook

_hf_hook.install()  # from_pretrained of converted directories (registered when transformers loads its quantizers)

__all__ = [
    "IncompleteOutputError",
    "LplrError",
    "RankPolicy",
    "__version__",
    "available_methods",
    "calibrate",
    "convert",
    "get_method",
    "load_calibration",
    "load_model",
    "load_state_dict",
    "make_settings",
]


def __getattr__(name):  # heavy modules (torch and up) load lazily: `import lplr_convert` stays light
    if name in ("RankPolicy", "available_methods", "get_method", "make_settings"):
        from . import methods
        return getattr(methods, name)
    if name == "convert":
        from .pipeline.convert import convert
        return convert
    if name in ("calibrate", "load_calibration"):
        from . import calibration
        return getattr(calibration, name)
    if name in ("load_state_dict", "load_model"):
        from .hf import loading
        return getattr(loading, name)
    raise AttributeError(name)
