"""The one dtype table: safetensors dtype codes <-> torch dtypes <-> the names the manifest records."""

from __future__ import annotations

import torch

__all__ = ["ST_CODES", "ST_DTYPES", "dtype_bits", "dtype_from_name", "dtype_name"]

# safetensors code -> torch dtype (float8 only where this torch has it).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    **{code: getattr(torch, name) for code, name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, name)},
}
ST_CODES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in ST_DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    """"float16" for torch.float16: the name the manifest records."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of `dtype_name` for every dtype a checkpoint can hold; ValueError for anything else."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"{name!r} is not a dtype this tool stores") from None


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits of one element."""
    return dtype.itemsize * 8
