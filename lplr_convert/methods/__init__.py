"""Compression methods behind one registry. Importing this package registers every built-in method."""

from .base import Method, MethodResult, available_methods, get_method, register
from .settings import RANK_POLICIES, MethodSettings, RankPolicy, resolve_rank
from . import copy, dsvd, laser, lplr, lsvd, rtn  # noqa: F401  (registration side effect)

__all__ = ["Method", "MethodResult", "MethodSettings", "RankPolicy", "RANK_POLICIES", "available_methods",
           "get_method", "register", "resolve_rank"]
