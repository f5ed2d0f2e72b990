"""Compression methods behind one registry. Importing this package registers every built-in method.

A method is one module: its settings dataclass (knobs declared with `settings.knob`, shared knob groups inherited
from `settings`), its stored part names, and a `Method` subclass registered with `@register(name)`.
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

__all__ = ["RANK_POLICIES", "InputStats", "Method", "MethodResult", "RankPolicy", "Settings",
           "all_knobs", "available_methods", "flat_defaults", "get_method", "knob", "make_settings", "register",
           "resolve_rank", "settings_from_flat"]
