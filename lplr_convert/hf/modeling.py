"""Model surgery: the factored layer, the transformers skeleton built without dense initialisation, and putting
factored layers in place of the linears they compress."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import constants as C
from ..errors import LplrError
from ..io.manifest import TensorRecord
from ..math.lowrank import product
from ..methods import get_method

__all__ = ["LowRankLinear", "config_dtype", "factors_for", "find_module", "float32_kept", "linear_shape", "lowrank_for",
           "mapped_by_transformers", "model_class", "params_on_meta", "set_module"]


class LowRankLinear(nn.Module):
    """y = L (R x) + b with L (out x r) and R (r x in), plus Q x for a full-size backbone Q (qlr: W = Q + L R);
    never forms L R in forward."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None,
                 base: torch.Tensor | None = None):
        super().__init__()
        self.left = nn.Parameter(left, requires_grad=False)
        self.right = nn.Parameter(right, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.base = None if base is None else nn.Parameter(base, requires_grad=False)
        self.out_features, self.rank = left.shape
        self.in_features = right.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(nn.functional.linear(x, self.right), self.left, self.bias)
        return y if self.base is None else y + nn.functional.linear(x, self.base)

    def to_dense(self) -> torch.Tensor:
        """The dense (out x in) weight (Q +) L R, formed only on request."""
        return product(self.left, self.right, self.base)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for code that reads `module.weight` (e.g. T5 checks its dtype). Formed on every access;
        the forward pass never uses it."""
        return self.to_dense()

    def extra_repr(self) -> str:
        extra = ", with backbone" if self.base is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{extra}"


@contextlib.contextmanager
def params_on_meta():
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


def model_class(root: Path):
    """(model class, config) from config.json, without the quantization_config this tool added."""
    try:
        import transformers
    except ImportError:
        raise LplrError("loading a model needs transformers; install it with `pip install lplr-convert[eval]`") from None
    cfg_path = root / C.CONFIG_FILE
    if not cfg_path.is_file():
        raise LplrError(f"{root} has no config.json; a model cannot be built without one (use load_state_dict)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(root))
    except (ValueError, KeyError, OSError) as e:
        raise LplrError(f"{cfg_path} cannot be read by transformers ({str(e).splitlines()[0]}); use load_state_dict")
    for added in ("quantization_config", "transformers_weights"):  # what convert added to config.json
        if hasattr(config, added):
            delattr(config, added)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel._model_mapping[type(config)]
    return cls, config


def config_dtype(config) -> torch.dtype | None:
    """The dtype config.json records for the model (transformers' dtype="auto"), or None."""
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) else None


def float32_kept(model: nn.Module, dtype: torch.dtype | None) -> Callable[[str], bool]:
    """Whether transformers keeps the parameter `name` of `model` in float32 when it loads the model in `dtype`: its
    `_keep_in_fp32_modules` in float16, its `_keep_in_fp32_modules_strict` in float16 and bfloat16, each searched in
    the parameter name as transformers does (T5's `wo`, DeepSeek-V3's router `gate.weight`)."""
    keys = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (torch.float16,
                                                                                          torch.bfloat16) else set()
    if dtype == torch.float16:
        keys |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not keys:
        return lambda name: False
    pattern = re.compile("|".join(k.replace("*", ".*") for k in sorted(keys)))
    return lambda name: pattern.search(name) is not None


def mapped_by_transformers(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint tensors whose names `model` does not have (families transformers renames or fuses on load, e.g.
    per-expert MoE weights stacked into 3-D experts) in the model's naming, by transformers' own loading of them into
    a model of the same class and config: ({model key: tensor}, checkpoint names it could not place)."""
    import transformers

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        other, info = type(model).from_pretrained(None, config=model.config, state_dict=tensors, dtype=dtype,
                                                  output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    missing = set(info["missing_keys"])
    return {k: v for k, v in other.state_dict().items() if k not in missing}, sorted(info["unexpected_keys"])


def name_candidates(name: str, prefix: str) -> tuple[str, ...]:
    """A checkpoint name as the model may spell it: as is, without, or with the model's base prefix."""
    if not prefix:
        return (name,)
    return (name, name.removeprefix(prefix + "."), f"{prefix}.{name}")


def find_module(model: nn.Module, key: str, prefix: str, names: dict | None = None) -> tuple[str, nn.Module] | None:
    """The module a checkpoint weight `key` ("<module>.weight") belongs to, trying the base-prefix spellings.
    `names` (dict(model.named_modules())) saves building it on every call."""
    names = dict(model.named_modules()) if names is None else names
    for cand in name_candidates(key.removesuffix(".weight"), prefix):
        if cand in names:
            return cand, names[cand]
    return None


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def linear_target(model: nn.Module, rec: TensorRecord, prefix: str,
                  names: dict | None = None) -> tuple[str, nn.Module] | None:
    """The nn.Linear / Conv1D module a factored weight belongs to, or None."""
    from transformers.pytorch_utils import Conv1D

    if not get_method(rec.method).factored or not rec.name.endswith(".weight"):
        return None
    target = find_module(model, rec.name, prefix, names)
    return target if target is not None and isinstance(target[1], (nn.Linear, Conv1D)) else None


def factors_for(mod: nn.Module, rec: TensorRecord, parts: dict) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None]:
    """The float32 factors (L: out x r, R: r x in) with y = L (R x) (+ Q x) for the linear `mod` that `rec`
    compresses, and its full-size backbone Q (out x in) when the method has one (qlr), else None."""
    from transformers.pytorch_utils import Conv1D

    method = get_method(rec.method)
    L, R = method.decode_factors(parts, rec.info)
    base = method.decode_base(parts, rec.info)
    if isinstance(mod, Conv1D) and not rec.transposed:
        L, R = R.T, L.T  # stored W (in x out) = L R  ->  y = x L R
        base = None if base is None else base.T
    return L, R, base


def max_tokens(model: nn.Module) -> int | None:
    """The longest token sequence `model` can embed: its config's position count (`max_position_embeddings`,
    `n_positions` or `n_ctx`), less the offset of learned position tables whose ids start after the padding index
    (RoBERTa-style: 514 positions, padding index 1, 512 tokens); None when the config sets no count."""
    config = getattr(model, "config", None)
    limit = next((v for key in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(v := getattr(config, key, None), int) and v > 0), None)
    if limit is None:
        return None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and name.endswith("position_embeddings") and mod.padding_idx is not None:
            return max(1, min(limit, mod.num_embeddings) - mod.padding_idx - 1)
    return limit


def linear_shape(mod: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a transformers Conv1D (whose weight is in x out)."""
    from transformers.pytorch_utils import Conv1D

    return (mod.nf, mod.weight.shape[0]) if isinstance(mod, Conv1D) else (mod.out_features, mod.in_features)


def lowrank_for(mod: nn.Module, rec: TensorRecord, parts: dict, device, dtype: torch.dtype | None) -> LowRankLinear:
    """A LowRankLinear standing in for `mod` (bias kept when it is already loaded, else an empty placeholder)."""
    from ..dtypes import dtype_from_name

    L, R, base = factors_for(mod, rec, parts)
    wdtype = dtype or dtype_from_name(rec.dtype)
    bias = getattr(mod, "bias", None)
    if bias is not None:
        bias = torch.empty(bias.shape, dtype=wdtype, device=device) if bias.device.type == "meta" else \
            bias.detach().to(device, wdtype)
    base = None if base is None else base.to(device, wdtype).contiguous()
    return LowRankLinear(L.to(device, wdtype).contiguous(), R.to(device, wdtype).contiguous(), bias, base)


def packed_layout(rec: TensorRecord):
    """The stored matrices (`PackedLayout`) of a 2-D weight record, or None where its method stores it dense (laser,
    copy) or it is no matrix (fused experts, vectors)."""
    if len(rec.shape) != 2 or not rec.name.endswith(".weight"):
        return None
    try:
        return get_method(rec.method).layout(rec.info)
    except (KeyError, TypeError, ValueError) as e:
        raise LplrError(f"tensor {rec.name}: its manifest record does not describe its stored matrices "
                        f"({type(e).__name__}: {e}); the output is damaged, re-run the conversion") from None


def packed_target(model: nn.Module, rec: TensorRecord, prefix: str, names: dict | None = None):
    """(module name, module, layout) of the nn.Linear / Conv1D that a record with stored matrices belongs to, or
    None (a dense record, or a weight that is no linear's)."""
    from transformers.pytorch_utils import Conv1D

    layout = packed_layout(rec)
    if layout is None:
        return None
    target = find_module(model, rec.name, prefix, names)
    if target is None or not isinstance(target[1], (nn.Linear, Conv1D)):
        return None
    return target[0], target[1], layout


def packed_for(mod: nn.Module, rec: TensorRecord, layout, parts: dict | None, device, dtype: torch.dtype | None,
               kernel: str | None = None, plan_device=None):
    """A PackedLinear standing in for the linear `mod` that `rec` stores (its stored fields as buffers, checked
    against the manifest's specs), or its meta-device twin when `parts` is None; laid out for `plan_device` when
    given (default: where the parts are). The bias is kept when already loaded, else an empty placeholder."""
    from transformers.pytorch_utils import Conv1D

    from ..dtypes import dtype_from_name
    from ..runtime.modules import PackedLinear, check_parts

    conv1d = isinstance(mod, Conv1D) and not rec.transposed
    out_f, in_f = linear_shape(mod)
    want = (in_f, out_f) if conv1d else (out_f, in_f)
    if tuple(layout.shape) != want:
        raise LplrError(f"tensor {rec.name}: the manifest stores a {list(layout.shape)} matrix, {type(mod).__name__} "
                        f"takes {list(want)}; the weights do not match config.json, re-run the conversion")
    if parts is not None:
        check_parts(rec.name, layout, parts)
    wdtype = dtype or dtype_from_name(rec.dtype)
    bias = getattr(mod, "bias", None)
    if bias is not None:
        bias = torch.empty(bias.shape, dtype=wdtype, device=device if parts is not None else "meta") \
            if bias.device.type == "meta" else bias.detach().to(device, wdtype)
    return PackedLinear(layout, parts, bias, conv1d, kernel=kernel, where=rec.name, device=device, dtype=wdtype,
                        plan_device=plan_device)
