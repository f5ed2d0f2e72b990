"""Writing converted outputs in other formats: a plain dense checkpoint (`decompress`)."""

from .dense import decompress

__all__ = ["decompress"]
