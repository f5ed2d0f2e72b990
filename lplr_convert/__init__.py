"""lplr-convert: compress Hugging Face checkpoints with low-rank, low-precision factorizations."""

__version__ = "0.1.0"

from .errors import IncompleteOutputError, LplrError  # noqa: E402
from .methods import MethodSettings, RankPolicy, available_methods, get_method  # noqa: E402

__all__ = ["__version__", "LplrError", "IncompleteOutputError", "MethodSettings", "RankPolicy", "available_methods",
           "get_method", "convert", "load_state_dict", "load_model"]


def __getattr__(name):  # heavy modules load lazily
    if name == "convert":
        from .convert import convert
        return convert
    if name in ("load_state_dict", "load_model"):
        from . import loading
        return getattr(loading, name)
    raise AttributeError(name)
