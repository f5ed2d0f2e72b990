"""Running a checkpoint one transformer block at a time.

The model is built from config.json with its parameters on the meta device and its buffers real (computed by the
model's own __init__, e.g. rotary inv_freq). Modules outside the block stack get their parameters from the source
checkpoint the first time they are called, so exactly the modules the forward runs before the first block are
materialised. The blocks are then replaced by stand-ins and the model's own forward is run on each batch: every
stand-in records the arguments and keyword arguments the real forward gives *its* block (masks and rotary tables
chosen per layer type, position ids, cache flags, ...) and passes the hidden states on; the last one stops the
forward. Block 0's recorded hidden states are the inputs of the block-by-block run.

Assumption: a block's arguments other than the hidden states do not depend on earlier blocks' outputs (true of the
decoder-only and encoder stacks in transformers; not of T5's position bias handed from block to block).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import constants as C
from ..errors import LplrError, opt
from ..io.reader import SourceCheckpoint
from ..modeling import model_class, name_candidates, params_on_meta
from ..plan import block_index
from .text import Batch

__all__ = ["BlockCall", "Skeleton", "build_skeleton", "record_calls", "release_outside", "return_freed_memory"]


@dataclass
class Skeleton:
    """A model whose parameters are on the meta device until materialised, and where its blocks live."""

    model: nn.Module
    blocks: nn.ModuleList
    blocks_name: str  # module name of the block stack, e.g. "model.layers"
    to_ckpt: dict[str, str]  # model state-dict key -> checkpoint tensor name
    causal: bool
    source: SourceCheckpoint
    device: torch.device
    dtype: torch.dtype  # compute dtype of materialised floating parameters
    loaded_outside: list[nn.Module] = field(default_factory=list)  # modules outside the blocks materialised so far

    def load(self, module: nn.Module, name: str, recurse: bool = True) -> None:
        """Give `module` (model name `name`) its parameters, and the buffers the checkpoint stores, from the source."""
        wanted = {}
        for getter in (module.named_parameters, module.named_buffers):
            for key, t in getter(prefix=name, recurse=recurse, remove_duplicate=False):
                ck = self.to_ckpt.get(key)
                meta = t is not None and t.device.type == "meta"
                if ck is not None and tuple(self.source.headers[ck].shape) == tuple(t.shape):
                    wanted[ck] = key
                elif meta:
                    why = "no tensor" if ck is None else f"shape {list(self.source.headers[ck].shape)} for"
                    raise LplrError(f"{self.source.root} has {why} {key} (shape {list(t.shape)}, base-model "
                                    f"prefix added or dropped); calibrate needs checkpoint names and shapes that "
                                    f"match the model's (not yet: families transformers renames or fuses on load, "
                                    f"e.g. MoE experts)")
        for ck, tensor in self.source.iter_tensors(list(wanted)):
            _assign(module, wanted[ck][len(name) + 1:] if name else wanted[ck], tensor, self.device, self.dtype)


def _assign(module: nn.Module, rel: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    owner_name, _, leaf = rel.rpartition(".")
    owner = module.get_submodule(owner_name)
    value = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _is_causal(config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    kind = type(config)
    return bool(getattr(config, "is_decoder", False)) or (kind in MODEL_FOR_CAUSAL_LM_MAPPING
                                                          and kind not in MODEL_FOR_MASKED_LM_MAPPING)


def _match_names(names, keys, prefix: str | None) -> dict[str, str]:
    """{checkpoint name: model key} for every checkpoint name with a place among `keys` (first spelling wins)."""
    keys, out = set(keys), {}
    for name in names:
        spelled = [c for c in name_candidates(name, prefix or "") if c in keys]
        if spelled:
            out[name] = spelled[0]
    return out


def _block_stack(model: nn.Module, ckpt_to_model: dict[str, str]) -> str:
    """Module name of the one nn.ModuleList that holds the checkpoint's numbered blocks."""
    found = set()
    for ck, key in ckpt_to_model.items():
        i = block_index(ck)
        parts = key.split(".")
        for j in range(1, len(parts) - 1):
            if i is not None and parts[j] == str(i) and \
                    isinstance(model.get_submodule(".".join(parts[:j])), nn.ModuleList):
                found.add(".".join(parts[:j]))
                break
    if not found:
        raise LplrError(f"{type(model).__name__} has no stack of numbered blocks matching the checkpoint's names; "
                        f"calibrate supports transformer stacks like model.layers.N or encoder.layer.N")
    if len(found) > 1:
        raise LplrError(f"{type(model).__name__} has several block stacks ({', '.join(sorted(found))}); calibrate "
                        f"supports models with one stack (decoder-only or encoder-only)")
    return found.pop()


def build_skeleton(src: SourceCheckpoint, device: str | torch.device, dtype: torch.dtype) -> Skeleton:
    """The model of `src`'s config.json on the meta device (no dense init, no remote code), in eval mode, with
    buffers on `device` and a materialise-on-first-call hook on every module outside the block stack."""
    root = Path(src.root)
    if not (root / C.CONFIG_FILE).is_file():
        raise LplrError(f"{root} has no config.json; calibrate builds the model from it, so pass the checkpoint "
                        f"directory that has one")
    cls, config = model_class(root)
    with params_on_meta():
        model = cls(config)
    model.eval()
    takes = getattr(model, "main_input_name", "input_ids")
    if takes != "input_ids":
        raise LplrError(f"{type(model).__name__} takes {takes}, not token ids; calibrate runs text through the model, "
                        f"so it supports text models only (convert this one without {opt('calibration')})")
    device = torch.device(device)
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    ckpt_to_model = _match_names(src.headers, model.state_dict().keys(), getattr(model, "base_model_prefix", ""))
    stack = _block_stack(model, ckpt_to_model)
    sk = Skeleton(model, model.get_submodule(stack), stack, {v: k for k, v in ckpt_to_model.items()},
                  _is_causal(config), src, device, dtype)
    for name, mod in model.named_modules():
        if name != stack and not name.startswith(stack + ".") and \
                any(p.device.type == "meta" for p in mod.parameters(recurse=False)):
            _load_on_call(sk, name, mod)
    return sk


def _load_on_call(sk: Skeleton, name: str, mod: nn.Module) -> None:
    def hook(module, args, kwargs):
        handle.remove()
        sk.load(module, name, recurse=False)
        sk.loaded_outside.append(module)

    handle = mod.register_forward_pre_hook(hook, with_kwargs=True)


def release_outside(sk: Skeleton) -> None:
    """Put the parameters materialised outside the blocks back on the meta device (frees the embeddings)."""
    for mod in sk.loaded_outside:
        for name, p in mod._parameters.items():
            if p is not None:
                mod._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)
    sk.loaded_outside.clear()
    return_freed_memory()


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    After a few multi-MiB tensors are freed, glibc raises its mmap threshold and serves later tensors of that size
    from the heap, whose freed pages it keeps: without this, peak RSS grew by about one bf16 block per block
    calibrated (16 vs 4 synthetic 1024-wide blocks: 567 vs 259 MiB above the imports; with it, see
    scripts/calibrate_memory.py).
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc():
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@dataclass
class BlockCall:
    """What the model's forward passed to one block for one batch, without the hidden states."""

    args: tuple
    kwargs: dict
    hidden_in_args: bool

    def run(self, block: nn.Module, hidden: torch.Tensor):
        if self.hidden_in_args:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, hidden_states=hidden, **self.kwargs)


def split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    """The hidden states (first positional argument, else `hidden_states=`) and the rest of a block call."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), True)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], BlockCall(tuple(args), rest, False)
    raise LplrError("a block was called without hidden states as its first argument or hidden_states=; calibrate "
                    "does not support this architecture")


def hidden_of(out) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, or the first element of a tuple)."""
    h = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, (tuple, list)) and out else None
    if not isinstance(h, torch.Tensor):
        raise LplrError(f"a block returned {type(out).__name__}, not hidden states; calibrate does not support this "
                        f"architecture")
    return h


def output_form(out) -> Callable[[torch.Tensor], object]:
    """A function giving hidden states the shape of a block's output: the tensor itself, or (hidden, *extras)."""
    hidden_of(out)
    if isinstance(out, torch.Tensor):
        return lambda h: h
    extras = tuple(out[1:])
    return lambda h: (h, *extras)


class _Stop(Exception):
    pass


class _StandIn(nn.Module):
    """Records the call of block `index`; passes the hidden states on (shaped by `form`), or stops the forward."""

    def __init__(self, index: int, calls: list, stop: bool, form):
        super().__init__()
        self.index, self.calls, self.stop, self.form = index, calls, stop, form

    def forward(self, *args, **kwargs):
        if len(self.calls) != self.index:
            raise LplrError(f"the model's forward calls its blocks out of order or more than once (block "
                            f"{self.index} after {len(self.calls)} calls); calibrate needs each block to run once")
        hidden, call = split_hidden(args, kwargs)
        self.calls.append((hidden, call))
        if self.stop:
            raise _Stop
        return self.form(hidden)


def _forward_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def record_calls(sk: Skeleton, batch: Batch, form=None) -> tuple[torch.Tensor, list[BlockCall]]:
    """Run the model's forward on `batch` with stand-ins for the blocks: (block 0's hidden states, the call of every
    block). Without `form` the forward stops at block 0 (only block 0's call is returned)."""
    originals = list(sk.blocks)
    n = 1 if form is None else len(originals)
    calls: list = []
    for i in range(len(originals)):
        sk.blocks[i] = _StandIn(i, calls, i == n - 1, form)
    try:
        sk.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **_forward_kwargs(sk.model))
    except _Stop:
        pass
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
        raise LplrError(f"{type(sk.model).__name__}'s forward uses a weight before its first block without calling "
                        f"its module ({str(e).splitlines()[0][:120]}); calibrate does not support this "
                        f"architecture") from None
    else:
        raise LplrError(f"{type(sk.model).__name__}'s forward did not reach block {n - 1}; calibrate needs every "
                        f"block of {sk.blocks_name} to run")
    finally:
        for i, block in enumerate(originals):
            sk.blocks[i] = block
    return calls[0][0], [c for _, c in calls]
