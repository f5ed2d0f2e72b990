"""The one reader of converted outputs: the checked manifest, every stored part of a tensor (shards checked by sha256
before use, one shard open at a time), and the decoded dense tensors. Used by the loaders, verify, the report's
tools and decompress.

Stored tensors are read with positioned reads into memory of their own (`io.reader.read_at`), not memory-mapped: a
tensor viewing a shard's map keeps the whole map alive, with every page the loader touched resident, after the
loader has moved on (a loaded model holding its scales would keep the whole shard resident beside its own copy)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import constants as C
from ..dtypes import dtype_from_name, dtype_name
from ..errors import LplrError, opt
from ..math.lowrank import product_rows
from ..methods import Method, get_method
from .manifest import Manifest, TensorRecord, is_intact, not_a_file, read_manifest

COPY_BLOCK_BYTES = 8 << 20  # a copied tensor loaded in another dtype is read and cast this many stored bytes at a time

__all__ = ["ConvertedOutput", "decode_record", "decoded_factors", "loaded_blocks", "loaded_tensor", "open_output",
           "record_problem"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ConvertedOutput:
    """A finished conversion directory. Use as a context manager (or call `close`) to release the open shard."""

    def __init__(self, root: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True,
                 check_records: bool = True):
        from .reader import source_roots

        self.root = Path(root)
        self.roots = source_roots(self.root)  # where a link in the output may lead (itself, a Hub snapshot's blobs)
        self.document = read_manifest(self.root)
        self.manifest = Manifest.from_json(self.document)
        for rec in self.records if check_records else ():  # no I/O: a loader names a broken record up front
            why = record_problem(rec)[0]
            if why is not None:
                raise LplrError(f"the manifest's record of {rec.name} {why}; the output is damaged, run "
                                f"`lplr-convert verify` and re-run the conversion")
        self.device, self.verify = str(device), verify
        self._open_name: str | None = None
        self._open = None  # the open shard's file
        self._headers: dict = {}  # its tensors' headers by stored name
        self._parsed: dict[str, dict] = {}  # every shard's headers once parsed (a shard may be opened again)

    @property
    def records(self) -> list[TensorRecord]:
        return self.manifest.tensors

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open, self._open_name, self._headers = None, None, {}

    def _shard(self, shard: str, name: str):
        """The open file of `shard` (checked first when verifying; the previous shard closed)."""
        from .reader import safetensors_header

        if shard not in self.manifest.shards:
            raise LplrError(f"the manifest places {name} in {shard}, which it does not list; the output directory "
                            f"is damaged, re-run the conversion")
        if self._open_name == shard:
            return self._open
        self.close()
        path = self.root / shard
        if self.verify:
            self.check_shard(shard)
        elif not_a_file(path, self.roots) is not None:
            raise self._missing(shard)
        try:
            headers = self._parsed.get(shard) or {h.name: h for h in safetensors_header(path, shard)}
            self._parsed[shard] = headers
            self._open = open(path, "rb", buffering=0)  # noqa: SIM115  (closed by `close`)
        except (LplrError, OSError) as e:
            raise LplrError(f"shard {shard} is unreadable ({_first_line(e)}); run `lplr-convert verify` and re-run "
                            f"the conversion") from None
        self._open_name, self._headers = shard, headers
        return self._open

    def _read(self, rec: TensorRecord, full: str, count: int | None = None, out: torch.Tensor | None = None,
              start: int = 0) -> torch.Tensor:
        """Stored tensor `full` of `rec` as a CPU tensor (`count`: only elements start..start+count of it, flat),
        read into `out` when given (contiguous, the stored dtype)."""
        from .reader import read_at

        h = self._header(rec, full)
        f = self._open
        numel = math.prod(h.shape)
        start, count = (0, numel) if count is None else (min(start, numel), max(0, min(count, numel - start)))
        if out is None:
            out = torch.empty(h.shape if count == numel else (count,), dtype=h.dtype)
        try:
            read_at(f, h.offset + start * h.dtype.itemsize, out)
        except (EOFError, OSError) as e:
            raise LplrError(f"tensor {full} cannot be read from {rec.shard} ({_first_line(e)}); run "
                            f"`lplr-convert verify` and re-run the conversion") from None
        return out

    def side_file(self, rel: str) -> Path | None:
        """A file the conversion copied (e.g. config.json): its path, checked against the manifest's size and sha256
        when verifying; None when the output has no such file. A file present but not listed is an LplrError."""
        path, meta = self.root / rel, self.manifest.files.get(rel)
        if meta is None:
            if path.exists():
                raise LplrError(f"{path} is not a file the manifest lists (added after the conversion); remove it or "
                                f"re-run the conversion")
            return None
        why = not_a_file(path, self.roots)
        if why is not None:
            raise LplrError(f"{rel} {why} in {self.root}, although the manifest lists it; re-run the conversion")
        if self.verify and not is_intact(path, meta):
            raise LplrError(f"{path} does not match the sha256 in the manifest (modified after the conversion); "
                            f"restore it, or re-run the conversion")
        return path

    def _missing(self, shard: str) -> LplrError:
        why = not_a_file(self.root / shard, self.roots) or "is missing"
        return LplrError(f"shard {shard} {why} in {self.root}; re-run the conversion (or {opt('resume')})")

    def check_shard(self, shard: str) -> None:
        """Raise LplrError unless `shard` has the size and sha256 the manifest records."""
        path, meta = self.root / shard, self.manifest.shards.get(shard)
        if not_a_file(path, self.roots) is not None:
            raise self._missing(shard)
        if not is_intact(path, meta):
            raise LplrError(f"shard {shard} does not match the sha256 in the manifest (damaged or modified); "
                            f"re-run the conversion, or re-download it")

    def stored_tensor(self, rec: TensorRecord, full: str, last: bool = False) -> torch.Tensor:
        """One stored tensor of a record (`last`: only its last entry, of a 1-D tensor), read without its siblings."""
        if not last:
            return self._read(rec, full).to(self.device)
        n = math.prod(self._header(rec, full).shape)
        return self._read(rec, full, count=1, start=max(0, n - 1)).to(self.device)

    def parts(self, rec: TensorRecord) -> dict[str, torch.Tensor]:
        """Every stored tensor of one weight, keyed by suffix ("" = the weight's own name), checked against the
        manifest's dtype and shape."""
        if not rec.stored or not isinstance(rec.stored, dict):
            raise LplrError(f"the manifest's record of {rec.name} stores no tensor; the output is damaged, re-run the "
                            f"conversion")
        out = {}
        for full, meta in rec.stored.items():
            self._check_header(rec, full, meta)
            out["" if full == rec.name else full[len(rec.name) + 1:]] = self._read(rec, full).to(self.device)
        return out

    def _header(self, rec: TensorRecord, full: str):
        """The header of stored tensor `full` of `rec`, its shard open (else LplrError)."""
        self._shard(str(rec.shard), full)
        h = self._headers.get(full)
        if h is None:
            raise LplrError(f"tensor {full} cannot be read from {rec.shard} (not in its header); run "
                            f"`lplr-convert verify` and re-run the conversion")
        return h

    def _check_header(self, rec: TensorRecord, full: str, meta: dict) -> None:
        """The shard's header gives stored tensor `full` the dtype and shape the manifest records (else LplrError)."""
        h = self._header(rec, full)
        if dtype_name(h.dtype) != meta.get("dtype") or list(h.shape) != list(meta.get("shape", ())):
            raise LplrError(f"stored tensor {full} has {h.dtype} {list(h.shape)}, the manifest says "
                            f"{meta.get('dtype')} {meta.get('shape')}; the output is damaged, re-run the "
                            f"conversion")

    def dense_as(self, rec: TensorRecord, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> torch.Tensor:
        """The decoded tensor (`dense`) in `dtype` (floating tensors only; None: as decoded) on `device` (None: the
        reader's), contiguous. A tensor stored as it is under its own name in its source dtype (copied) is read
        straight into the result a block of `COPY_BLOCK_BYTES` at a time: the only full-size tensor formed is the
        result (a float32 embedding loaded in bfloat16 never exists in float32)."""
        device = self.device if device is None else device
        meta = rec.stored.get(rec.name) if isinstance(rec.stored, dict) else None
        if rec.method != "copy" or len(rec.stored) != 1 or not isinstance(meta, dict) or meta.get("dtype") != rec.dtype:
            W = self.dense(rec)
            return (W.to(device, dtype) if dtype is not None and W.is_floating_point() else W.to(device)).contiguous()
        self._check_header(rec, rec.name, meta)
        h = self._headers[rec.name]
        if dtype is None or not h.dtype.is_floating_point or dtype == h.dtype:
            return self._read(rec, rec.name).to(device)
        out = torch.empty(h.shape, dtype=dtype, device=device)
        flat, numel = out.view(-1), out.numel()
        step = max(1, COPY_BLOCK_BYTES // h.dtype.itemsize)
        block = torch.empty(min(step, numel), dtype=h.dtype)
        for start in range(0, numel, step):
            n = min(step, numel - start)
            flat[start:start + n].copy_(self._read(rec, rec.name, count=n, out=block[:n], start=start))
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


def record_problem(rec: TensorRecord) -> tuple[str | None, dict]:
    """What makes a record undecodable, judged from the manifest alone (method, info, quantizer specs against the
    stored parts' names, dtypes and shapes), or None; and {stored name: spec} of its bit-packed parts."""
    from ..math import quantize as qz
    from ..methods._common import part_name
    from ..pipeline.experts import EXPERTS_KEY

    if not rec.stored:
        return "stores no tensor", {}
    try:
        method = get_method(rec.method)
    except LplrError as e:
        return str(e), {}
    if not isinstance(rec.info, dict) or not isinstance(rec.shape, list):
        return "has a malformed record (info or shape)", {}
    if rec.method == "copy" or set(rec.stored) == {rec.name}:  # a dense tensor under its own name (copy, laser)
        meta = rec.stored.get(rec.name)
        if len(rec.stored) != 1 or not isinstance(meta, dict) or list(meta.get("shape", ())) != list(rec.shape) or \
                rec.method == "copy" and meta.get("dtype") != rec.dtype:
            what = f"{meta.get('dtype')} {meta.get('shape')}" if isinstance(meta, dict) else "something else"
            return f"stores {min(rec.stored)} as {what}, not the {rec.dtype} {rec.shape} tensor it records", {}
        return None, {}
    if EXPERTS_KEY in rec.info or type(method).layout is Method.layout:
        return None, {}  # fused experts, or a method that declares no stored matrices: decoded in full only (`full`)
    if len(rec.shape) != 2:
        return f"is a compressed tensor of shape {rec.shape}, not a matrix", {}
    m, n = rec.shape[::-1] if rec.transposed else rec.shape
    try:
        layout = method.layout(rec.info)  # the method says which stored matrices make the weight
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"has an invalid quantizer spec in its info ({type(e).__name__}: {e})", {}
    if layout is None:
        return "has no quantized part in its info", {}
    predicted, packed = {}, {}
    for qp in (layout.backbone, layout.left, layout.right):
        if qp is None:
            continue
        for field, (dtype, shape) in qz.field_specs(qp.spec).items():
            full = f"{rec.name}.{part_name(qp.part, field)}"
            predicted[full] = (None if field == C.FIELD_FLOAT else dtype, list(shape))
            if field in (C.FIELD_PACKED, C.FIELD_ZERO_POINT):  # (bits, codes packed)
                packed[full] = (qp.spec.bits,
                                math.prod(qp.spec.scale_shape if field == C.FIELD_ZERO_POINT else qp.spec.shape))
    rank = rec.info.get("rank")
    if layout.backbone is not None and tuple(layout.backbone.spec.shape) != (m, n):
        return f"has a quantized matrix of shape {list(layout.backbone.spec.shape)}, the weight is {[m, n]}", {}
    if layout.low_rank:
        left, right = tuple(layout.left.spec.shape), tuple(layout.right.spec.shape)
        if left[0] != m or right[1] != n or left[1] != right[0] or rank is not None and left[1] != rank:
            return f"has factors {[list(left), list(right)]} of rank {rank}, which do not make a {[m, n]} weight", {}
    if set(predicted) != set(rec.stored):
        odd = sorted(set(predicted) ^ set(rec.stored))
        return f"stores other parts than its quantizer specs give (first: {odd[0]})", {}
    for full, (dtype, shape) in predicted.items():
        meta = rec.stored[full]
        if list(meta.get("shape", ())) != shape or dtype is not None and meta.get("dtype") != dtype:
            return (f"stores {full} as {meta.get('dtype')} {meta.get('shape')}, its quantizer spec gives "
                    f"{dtype or 'float'} {shape}"), {}
    return None, packed


def open_output(root: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> ConvertedOutput:
    """A reader of the finished conversion in `root` (raises LplrError when it is incomplete, damaged or modified)."""
    return ConvertedOutput(root, device, verify)
