"""Compression methods behind one registry. Importing this package registers every built-in method."""

from . import copy, dsvd, laser, lplr, lsvd, rtn  # noqa: F401  (registration side effect)
from .base import Method, MethodResult, available_methods, get_method, register
from .settings import RANK_POLICIES, MethodSettings, RankPolicy, resolve_rank

__all__ = ["RANK_POLICIES", "Method", "MethodResult", "MethodSettings", "RankPolicy", "available_methods",
           "get_method", "register", "resolve_rank"]
