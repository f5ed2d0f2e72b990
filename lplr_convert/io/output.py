"""The one reader of converted outputs: the checked manifest, every stored part of a tensor (shards checked by sha256
before use, one shard open at a time), and the decoded dense tensors. Used by the loaders, verify, the report's
tools and decompress."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..dtypes import dtype_from_name, dtype_name
from ..errors import LplrError, opt
from ..math.lowrank import product_rows
from ..methods import get_method
from .manifest import Manifest, TensorRecord, is_intact, read_manifest

__all__ = ["ConvertedOutput", "decode_record", "decoded_factors", "loaded_blocks", "loaded_tensor", "open_output"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ConvertedOutput:
    """A finished conversion directory. Use as a context manager (or call `close`) to release the open shard."""

    def __init__(self, root: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True):
        self.root = Path(root)
        self.document = read_manifest(self.root)
        self.manifest = Manifest.from_json(self.document)
        self.device, self.verify = str(device), verify
        self._open_name: str | None = None
        self._open = None

    @property
    def records(self) -> list[TensorRecord]:
        return self.manifest.tensors

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._open, self._open_name = None, None

    def _shard(self, shard: str, name: str):
        from safetensors import safe_open

        if shard not in self.manifest.shards:
            raise LplrError(f"the manifest places {name} in {shard}, which it does not list; the output directory "
                            f"is damaged, re-run the conversion")
        if self._open_name == shard:
            return self._open
        self.close()
        path = self.root / shard
        if self.verify:
            self.check_shard(shard)
        elif not path.is_file():
            raise self._missing(shard)
        try:
            self._open = safe_open(str(path), framework="pt", device=self.device)
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError, ...)
            raise LplrError(f"shard {shard} is unreadable ({_first_line(e)}); run `lplr-convert verify` and re-run "
                            f"the conversion") from None
        self._open_name = shard
        return self._open

    def side_file(self, rel: str) -> Path | None:
        """A file the conversion copied (e.g. config.json): its path, checked against the manifest's size and sha256
        when verifying; None when the output has no such file. A file present but not listed is an LplrError."""
        path, meta = self.root / rel, self.manifest.files.get(rel)
        if meta is None:
            if path.exists():
                raise LplrError(f"{path} is not a file the manifest lists (added after the conversion); remove it or "
                                f"re-run the conversion")
            return None
        if not path.is_file():
            raise LplrError(f"{rel} is missing from {self.root} although the manifest lists it; re-run the conversion")
        if self.verify and not is_intact(path, meta):
            raise LplrError(f"{path} does not match the sha256 in the manifest (modified after the conversion); "
                            f"restore it, or re-run the conversion")
        return path

    def _missing(self, shard: str) -> LplrError:
        return LplrError(f"shard {shard} is missing from {self.root}; re-run the conversion (or {opt('resume')})")

    def check_shard(self, shard: str) -> None:
        """Raise LplrError unless `shard` has the size and sha256 the manifest records."""
        path, meta = self.root / shard, self.manifest.shards.get(shard)
        if not path.is_file():
            raise self._missing(shard)
        if not is_intact(path, meta):
            raise LplrError(f"shard {shard} does not match the sha256 in the manifest (damaged or modified); "
                            f"re-run the conversion, or re-download it")

    def parts(self, rec: TensorRecord) -> dict[str, torch.Tensor]:
        """Every stored tensor of one weight, keyed by suffix ("" = the weight's own name), checked against the
        manifest's dtype and shape."""
        out = {}
        for full, meta in rec.stored.items():
            try:
                t = self._shard(str(rec.shard), full).get_tensor(full)
            except LplrError:
                raise
            except Exception as e:  # noqa: BLE001
                raise LplrError(f"tensor {full} cannot be read from {rec.shard} ({_first_line(e)}); run "
                                f"`lplr-convert verify` and re-run the conversion") from None
            if dtype_name(t.dtype) != meta.get("dtype") or list(t.shape) != list(meta.get("shape", ())):
                raise LplrError(f"stored tensor {full} has {t.dtype} {list(t.shape)}, the manifest says "
                                f"{meta.get('dtype')} {meta.get('shape')}; the output is damaged, re-run the "
                                f"conversion")
            out["" if full == rec.name else full[len(rec.name) + 1:]] = t
        return out

    def dense(self, rec: TensorRecord, parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The decoded tensor in its source name's shape and dtype (Conv1D orientation restored)."""
        return decode_record(rec, self.parts(rec) if parts is None else parts)

    def iter_dense(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, dense tensor) for every tensor, in manifest order, one at a time."""
        for rec in self.records:
            yield rec.name, self.dense(rec)

    def headers(self) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
        """Stored tensor name -> (shard, dtype, shape) read from the shard headers present on disk."""
        from .reader import safetensors_header

        out = {}
        for shard in self.manifest.shards:
            if (self.root / shard).is_file():
                for h in safetensors_header(self.root / shard, shard):
                    out[h.name] = (shard, h.dtype, h.shape)
        return out


def loaded_tensor(method, parts: dict[str, torch.Tensor], info: dict, transposed: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """Exactly what every loader returns for one stored weight: its decoded parts (experts stacked back), the source
    orientation (Conv1D weights and [in, out] experts transposed back), cast to the source `dtype`, contiguous, on
    the parts' device. The conversion records the error of this tensor."""
    from ..pipeline.experts import EXPERTS_KEY, decode_experts

    W = decode_experts(method, parts, info) if EXPERTS_KEY in info else method.decode(parts, info)
    if transposed:
        W = W.transpose(-2, -1)
    return W.to(dtype).contiguous()


def loaded_blocks(method, parts: dict[str, torch.Tensor], info: dict, W: torch.Tensor, transposed: bool,
                  dtype: torch.dtype, factors: tuple | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Row blocks (rows of W, the same rows of `loaded_tensor`'s result) for measuring what a loader returns without
    holding it whole; W is the source tensor as read (source orientation, on the parts' device).

    2-D weights come in the method's orientation (out x in: Conv1D weights transposed, as the methods saw them). A
    factored weight (`method.factored`, not fused experts) is decoded a block at a time by `math.lowrank`'s
    schedule, the one its `decode` uses, from `factors` = (L, R, base or None) when the caller decoded them already:
    the same bits as `loaded_tensor`, without the float32 product or its cast copy at full size. Anything else is
    decoded whole by `loaded_tensor` (one pair; fused experts as [experts * rows, cols] in the source orientation)."""
    from ..pipeline.experts import EXPERTS_KEY

    if method.factored and EXPERTS_KEY not in info:
        L, R, base = factors if factors is not None else decoded_factors(method, parts, info)
        rows = W.T if transposed else W
        for i, block in product_rows(L, R, base):
            yield rows[i:i + block.shape[0]], block.to(dtype)
        return
    full = loaded_tensor(method, parts, info, transposed, dtype)
    yield (W.T, full.T) if transposed and W.dim() == 2 else (W.flatten(0, -2), full.flatten(0, -2))


def decoded_factors(method, parts: dict[str, torch.Tensor], info: dict) -> tuple:
    """(L, R, base or None): the float32 factors (and Q + L R's backbone) a factored layer is built from."""
    L, R = method.decode_factors(parts, info)
    return L, R, method.decode_base(parts, info)


def decode_record(rec: TensorRecord, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor of `rec` from its stored parts (`loaded_tensor`), in its source name's shape and dtype;
    LplrError when the parts do not decode to it."""
    try:
        W = loaded_tensor(get_method(rec.method), parts, rec.info, rec.transposed, dtype_from_name(rec.dtype))
    except LplrError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise LplrError(f"tensor {rec.name} cannot be decoded ({type(e).__name__}: {e}); the output is damaged, "
                        f"re-run the conversion") from None
    if list(W.shape) != list(rec.shape):
        raise LplrError(f"tensor {rec.name} decodes to shape {list(W.shape)}, expected {rec.shape}; the output "
                        f"is damaged, re-run the conversion")
    return W


def open_output(root: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> ConvertedOutput:
    """A reader of the finished conversion in `root` (raises LplrError when it is incomplete, damaged or modified)."""
    return ConvertedOutput(root, device, verify)
