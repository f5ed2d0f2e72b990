"""Reconstitute a converted checkpoint: dense state dict, transformers model with factored layers, plain export."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from . import constants as C
from .errors import LplrError
from .io.manifest import read_manifest, sha256_file, write_json_atomic
from .methods import get_method

__all__ = ["LowRankLinear", "decompress", "iter_dense", "load_model", "load_state_dict"]


class LowRankLinear(nn.Module):
    """y = L (R x) + b with L (out x r) and R (r x in); never forms the dense weight in forward."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.left = nn.Parameter(left, requires_grad=False)
        self.right = nn.Parameter(right, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.rank = left.shape
        self.in_features = right.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.right), self.left, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The dense (out x in) weight L R, formed only on request."""
        return self.left @ self.right

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for code that reads `module.weight` (e.g. T5 checks its dtype). Formed on every access;
        the forward pass never uses it."""
        return self.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class _Shards:
    """Lazy access to the stored tensors of an output directory, one shard file open at a time."""

    def __init__(self, root: Path, manifest: dict, device: str = "cpu", verify: bool = True):
        self.root, self.device, self.verify = root, device, verify
        self._open_name, self._open = None, None
        self.shards = manifest.get(C.M_SHARDS) or {}

    def get(self, shard: str, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if shard not in self.shards:
            raise LplrError(f"the manifest places {name} in {shard}, which it does not list; the output directory "
                            f"is damaged, re-run the conversion")
        if self._open_name != shard:
            self.close()
            path = self.root / shard
            if not path.is_file():
                raise LplrError(f"shard {shard} is missing from {self.root}; re-run the conversion (or --resume)")
            if self.verify:
                meta = self.shards[shard]
                if not isinstance(meta, dict) or path.stat().st_size != meta.get("bytes") or \
                        sha256_file(path) != meta.get("sha256"):
                    raise LplrError(f"shard {shard} does not match the sha256 in the manifest (damaged or modified); "
                                    f"re-run the conversion, or re-download it")
            try:
                self._open = safe_open(str(path), framework="pt", device=self.device)
            except Exception as e:  # noqa: BLE001  (SafetensorError, OSError, ...)
                raise LplrError(f"shard {shard} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__});"
                                f" run `lplr-convert verify` and re-run the conversion") from None
            self._open_name = shard
        try:
            return self._open.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise LplrError(f"tensor {name} cannot be read from {shard} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"run `lplr-convert verify` and re-run the conversion") from None

    def close(self) -> None:
        self._open, self._open_name = None, None


def _stored_parts(shards: _Shards, rec: dict) -> dict[str, torch.Tensor]:
    """Every stored tensor of one weight, keyed by suffix, checked against the manifest's dtype and shape."""
    parts = {}
    name = rec["name"]
    for full, meta in rec["stored"].items():
        t = shards.get(rec["shard"], full)
        if str(t.dtype).removeprefix("torch.") != meta["dtype"] or list(t.shape) != list(meta["shape"]):
            raise LplrError(f"stored tensor {full} has {t.dtype} {list(t.shape)}, the manifest says {meta['dtype']} "
                            f"{meta['shape']}; the output is damaged, re-run the conversion")
        suffix = "" if full == name else full[len(name) + 1:]
        parts[suffix] = t
    return parts


def _decode(rec: dict, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    try:
        method = get_method(rec["method"])
        W = method.decode(parts, rec["info"])
    except LplrError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise LplrError(f"tensor {rec['name']} cannot be decoded ({type(e).__name__}: {e}); the output is damaged, "
                        f"re-run the conversion") from None
    if rec.get("transposed"):
        W = W.T
    W = W.to(getattr(torch, rec["dtype"])).contiguous()
    if list(W.shape) != list(rec["shape"]):
        raise LplrError(f"tensor {rec['name']} decodes to shape {list(W.shape)}, expected {rec['shape']}; the output "
                        f"is damaged, re-run the conversion")
    return W


def _records(manifest: dict) -> list[dict]:
    recs = manifest.get(C.M_TENSORS)
    if not isinstance(recs, list):
        raise LplrError("the manifest has no tensor list; the output is damaged, re-run the conversion")
    return recs


def iter_dense(path: str | Path, device: str = "cpu", verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, dense tensor) for every tensor of a converted directory, in manifest order, one at a time.

    With verify=True (the default) every shard's sha256 is checked against the manifest before it is used.
    """
    root = Path(path)
    manifest = read_manifest(root)
    shards = _Shards(root, manifest, device, verify)
    try:
        for rec in _records(manifest):
            try:
                yield rec["name"], _decode(rec, _stored_parts(shards, rec))
            except (KeyError, TypeError) as e:
                raise LplrError(f"the manifest entry for {rec.get('name', '?') if isinstance(rec, dict) else '?'} is "
                                f"malformed ({e}); the output is damaged, re-run the conversion") from None
    finally:
        shards.close()


def load_state_dict(path: str | Path, device: str = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
    """The dense reconstituted state dict: original names, shapes, dtypes (Conv1D orientation restored).

    Raises LplrError (never returns a wrong tensor) when the directory is incomplete, damaged or modified.
    """
    return dict(iter_dense(path, device, verify))


@contextlib.contextmanager
def _params_on_meta():
    """Create parameters on the meta device (no memory, no init) while buffers stay real."""
    old = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        old(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def _model_class(root: Path):
    """(model class, config) from config.json, without the quantization_config this tool added."""
    try:
        import transformers
    except ImportError:
        raise LplrError("load_model needs transformers; install it with `pip install lplr-convert[eval]`") from None
    cfg_path = root / C.CONFIG_FILE
    if not cfg_path.is_file():
        raise LplrError(f"{root} has no config.json; load_model needs one (use load_state_dict instead)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(root))
    except (ValueError, KeyError, OSError) as e:
        raise LplrError(f"{cfg_path} cannot be read by transformers ({str(e).splitlines()[0]}); use load_state_dict")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel._model_mapping[type(config)]
    return cls, config


def _module_for(model: nn.Module, key: str, prefix: str) -> tuple[str, nn.Module] | None:
    names = dict(model.named_modules())
    mod_name = key.removesuffix(".weight")
    for cand in (mod_name, mod_name.removeprefix(prefix + ".") if prefix else None,
                 f"{prefix}.{mod_name}" if prefix else None):
        if cand and cand in names:
            return cand, names[cand]
    return None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _linear_target(model: nn.Module, rec: dict, prefix: str):
    """The nn.Linear / Conv1D module a factored weight belongs to, or None."""
    from transformers.pytorch_utils import Conv1D

    if not get_method(rec["method"]).factored or not rec["name"].endswith(".weight"):
        return None
    target = _module_for(model, rec["name"], prefix)
    return target if target is not None and isinstance(target[1], (nn.Linear, Conv1D)) else None


def _lowrank(mod: nn.Module, rec: dict, parts: dict, device: str, dtype: torch.dtype | None) -> LowRankLinear:
    """A LowRankLinear standing in for `mod` (bias kept when it is already loaded, else an empty placeholder)."""
    from transformers.pytorch_utils import Conv1D

    L, R = get_method(rec["method"]).decode_factors(parts, rec["info"])
    wdtype = dtype or getattr(torch, rec["dtype"])
    if isinstance(mod, Conv1D) and not rec.get("transposed"):
        L, R = R.T, L.T  # stored W (in x out) = L R  ->  y = x L R
    bias = getattr(mod, "bias", None)
    if bias is not None:
        bias = torch.empty(bias.shape, dtype=wdtype, device=device) if bias.device.type == "meta" else \
            bias.detach().to(device, wdtype)
    return LowRankLinear(L.to(device, wdtype).contiguous(), R.to(device, wdtype).contiguous(), bias)


def _load_direct(root: Path, manifest: dict, factored: bool, device: str, dtype, verify: bool):
    """Checkpoint names used as they are (base_model_prefix added or dropped): no dense init, factored layers
    built straight from the stored codes. Returns None when the model's names differ (transformers 5 renames or
    fuses some families' weights on load)."""
    cls, config = _model_class(root)
    with _params_on_meta():
        model = cls(config).eval()
    prefix = getattr(model, "base_model_prefix", "") or ""
    shards = _Shards(root, manifest, device, verify)
    dense: dict[str, torch.Tensor] = {}
    replaced = 0
    try:
        for rec in _records(manifest):
            parts = _stored_parts(shards, rec)
            target = _linear_target(model, rec, prefix) if factored else None
            if target is not None:
                _set_module(model, target[0], _lowrank(target[1], rec, parts, device, dtype))
                replaced += 1
                continue
            W = _decode(rec, parts)
            dense[rec["name"]] = W.to(device, dtype) if dtype is not None and W.is_floating_point() else W.to(device)
    finally:
        shards.close()
    keys_now = set(model.state_dict().keys())
    remapped = {}
    for k, v in dense.items():
        for cand in (k, k.removeprefix(prefix + "."), f"{prefix}.{k}"):
            if cand in keys_now:
                remapped[cand] = v
                break
        else:
            logger.debug(f"checkpoint tensor {k} has no place in {type(model).__name__} by name")
    model.load_state_dict(remapped, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    logger.info(f"loaded {type(model).__name__} with {replaced} factored layers")
    return model


def _load_via_transformers(root: Path, manifest: dict, factored: bool, device: str, dtype, verify: bool):
    """Dense weights through transformers' own loading (its renames and fusions), then factored layers swapped in."""
    cls, config = _model_class(root)
    dense = dict(iter_dense(root, device, verify))
    try:
        model = cls.from_pretrained(None, config=config, state_dict=dense, dtype=dtype or "auto").eval()
    except Exception as e:  # noqa: BLE001  (any loading failure becomes one line)
        raise LplrError(f"{cls.__name__} cannot be built from the converted weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); the config does not match them") from None
    del dense
    replaced = 0
    if factored:
        prefix = getattr(model, "base_model_prefix", "") or ""
        shards = _Shards(root, manifest, device, verify=False)
        try:
            for rec in _records(manifest):
                target = _linear_target(model, rec, prefix)
                if target is not None:
                    _set_module(model, target[0], _lowrank(target[1], rec, _stored_parts(shards, rec), device, dtype))
                    replaced += 1
        finally:
            shards.close()
    logger.info(f"loaded {type(model).__name__} through transformers' weight mapping with {replaced} factored layers")
    return model


def load_model(path: str | Path, factored: bool = True, device: str = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True):
    """A transformers model built from config.json. No trust_remote_code.

    factored=True replaces every compressed linear (lplr/lsvd/dsvd) by a LowRankLinear computing y = L(R x) + b;
    factored=False loads dense reconstituted weights. Parameters are created on the meta device and never
    initialised densely, except for architectures whose module names differ from their checkpoint names (e.g.
    fused MoE experts in transformers 5): those go through transformers' own loading of the dense weights first.
    """
    root = Path(path)
    manifest = read_manifest(root)
    model = _load_direct(root, manifest, factored, device, dtype, verify)
    if model is None:
        model = _load_via_transformers(root, manifest, factored, device, dtype, verify)
    return model.to(device).eval()


def decompress(path: str | Path, out_path: str | Path, max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """Write a plain Hugging Face checkpoint (original names, shapes, dtypes) that transformers loads directly."""
    from .convert import parse_size
    from .io.writer import ShardWriter

    root, out = Path(path), Path(out_path)
    manifest = read_manifest(root)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LplrError(f"--out-path {out} is not empty; pass --overwrite or choose an empty directory")
        if not (out / C.SAFE_INDEX).exists() and not (out / C.SAFE_SINGLE).exists():
            raise LplrError(f"--out-path {out} is not empty and does not look like a checkpoint; choose an empty "
                            f"directory")
        shutil.rmtree(out)
    if out.resolve() == root.resolve():
        raise LplrError("--out-path must differ from --in-path")
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, parse_size(max_shard_size))
    from tqdm import tqdm

    recs = _records(manifest)
    for name, W in tqdm(iter_dense(root), total=len(recs), desc="decompressing", unit="tensor"):
        writer.add_group(name, {name: W})
    weight_map, _ = writer.finalize()
    if len(writer.closed) == 1:
        only = next(iter(set(weight_map.values())))
        (out / only).rename(out / C.SAFE_SINGLE)
    else:
        total = sum(r["original_bytes"] for r in recs)
        write_json_atomic(out / C.SAFE_INDEX, {"metadata": {"total_size": total},
                                               "weight_map": dict(sorted(weight_map.items()))})
    ours = {C.MANIFEST_FILE, C.SAFE_INDEX, C.REPORT_JSON, C.REPORT_CSV, C.REPORT_MD, C.PLOT_ERROR, C.PLOT_BITS,
            C.PLOT_SPECTRUM}
    shard_names = set((manifest.get(C.M_SHARDS) or {}).keys())
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or str(rel) in ours or str(rel) in shard_names:
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if str(rel) == C.CONFIG_FILE:
            cfg = json.loads(p.read_text(encoding="utf-8"))
            cfg.pop("quantization_config", None)
            dst.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(p, dst)
    logger.info(f"wrote a plain checkpoint to {out}")
    return out
