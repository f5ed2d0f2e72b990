"""Compression methods behind one registry. Importing this package registers every built-in method.

A method is one module: its settings dataclass (knobs declared with `settings.knob`, shared knob groups inherited
from `settings`), its stored part names, and a `Method` subclass registered with `@register(name)`. A method outside
this package registers through the entry-point group `lplr_convert.methods` of its installed distribution.
"""

from . import copy, dsvd, gptq, laser, lplr, lsvd, qlr, rtn  # noqa: F401  (registration side effect)
from .base import (
                   InputStats,
                   Method,
                   MethodResult,
                   all_knobs,
                   available_methods,
                   flat_defaults,
                   get_method,
                   make_settings,
                   register,
                   settings_from_flat,
)
from .settings import RANK_POLICIES, RankPolicy, Settings, knob, resolve_rank

ENTRY_POINT_GROUP = "lplr_convert.methods"


def _load_entry_points() -> None:
    """Register the methods installed packages declare in the entry-point group `lplr_convert.methods`: each entry
    names a module whose `@register(name)` registers its method when imported, or a `Method` subclass registered
    under the entry's name. A plugin that fails to load is named in a warning; the built-in methods still work."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Method) and ep.name not in available_methods():
                register(ep.name)(obj)
        except Exception as e:  # noqa: BLE001  (any error of third-party code)
            from loguru import logger

            logger.warning(f"method plugin {ep.name} ({ep.value}) could not be loaded: {type(e).__name__}: {e}")


_load_entry_points()

__all__ = ["ENTRY_POINT_GROUP", "RANK_POLICIES", "InputStats", "Method", "MethodResult", "RankPolicy", "Settings",
           "all_knobs", "available_methods", "flat_defaults", "get_method", "knob", "make_settings", "register",
           "resolve_rank", "settings_from_flat"]
