"""Running a checkpoint one transformer block at a time.

The model is built from config.json with its parameters on the meta device and its buffers real (computed by the
model's own __init__, e.g. rotary inv_freq). A module outside the block stack gets its parameters from the source
checkpoint the first time the recording forward uses one of them (calls the module, or reads the weight directly,
as DeBERTa's encoder does with its relative embeddings), so exactly what the forward uses before the first block is
materialised. The blocks are then replaced by stand-ins and the model's own forward is run on each batch: every
stand-in records the arguments and keyword arguments the real forward gives *its* block (masks and rotary tables
chosen per layer type, position ids, cache flags, ...) and passes the hidden states on; the forward is stopped when
it calls a module with weights outside the stack after the blocks ran. The recorded sequence of block calls is the
schedule of the block-by-block run: usually each block once in order; a block the forward runs several times in a
row (ALBERT's shared layer group) is run that many times, its statistics accumulated over all its calls. The first
call's recorded hidden states are the inputs of the block-by-block run.

Checked, each refused with a one-line error: every block runs, the calls of one block are consecutive, the hidden
states pass from one block call to the next unchanged (nothing between the blocks transforms them), no recorded
argument is a meta tensor, and the stack's weights have the checkpoint's names (not renamed or fused on load).
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
from ..hf.modeling import model_class, name_candidates, params_on_meta
from ..io.reader import SourceCheckpoint
from ..pipeline.plan import block_index
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
    schedule: list[int] = field(default_factory=list)  # the block index of each block call of the forward, in order
    recording: bool = False  # a recording forward runs: outside modules load their weights when first used

    def load(self, module: nn.Module, name: str, recurse: bool = True) -> None:
        """Give `module` (model name `name`) its parameters not loaded yet, and the buffers the checkpoint stores,
        from the source."""
        wanted = {}
        for params, getter in ((True, module.named_parameters), (False, module.named_buffers)):
            for key, t in getter(prefix=name, recurse=recurse, remove_duplicate=False):
                ck = self.to_ckpt.get(key)
                meta = t is not None and t.device.type == "meta"
                if params and not meta:
                    continue  # loaded already
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


def _check_names(model: nn.Module, stack: str, ckpt_to_model: dict[str, str], headers) -> None:
    """Refuse a stack whose parameters the checkpoint does not hold under their names and shapes (families whose
    weights transformers renames or fuses on load, e.g. per-expert MoE weights fused into 3-D experts)."""
    to_ckpt = {key: ck for ck, key in ckpt_to_model.items()}
    odd = [key for key, p in model.named_parameters() if key.startswith(stack + ".")
           and (key not in to_ckpt or tuple(headers[to_ckpt[key]].shape) != tuple(p.shape))]
    if odd:
        raise LplrError(f"calibrate does not support {type(model).__name__}: transformers renames or fuses its block "
                        f"weights on load ({len(odd)} parameters, such as {odd[0]}, have no checkpoint tensor of that "
                        f"name and shape; e.g. per-expert MoE weights fused into 3-D experts), so its blocks cannot "
                        f"be loaded one at a time; convert it without {opt('calibration')}")


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
    _check_names(model, stack, ckpt_to_model, src.headers)
    sk = Skeleton(model, model.get_submodule(stack), stack, {v: k for k, v in ckpt_to_model.items()},
                  _is_causal(config), src, device, dtype)
    for name, mod in _outside(sk):
        _load_on_use(sk, name, mod)
    return sk


def _outside(sk: Skeleton) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module outside the block stack with parameters of its own."""
    return [(name, mod) for name, mod in sk.model.named_modules()
            if name != sk.blocks_name and not name.startswith(sk.blocks_name + ".")
            and next(mod.parameters(recurse=False), None) is not None]


def _load_on_use(sk: Skeleton, name: str, mod: nn.Module) -> None:
    """Make `mod` load its parameters from the source the first time a recording forward reads one of them (by
    calling it or reading the attribute): its class is swapped for a subclass whose attribute lookup does that and
    then restores the class."""
    cls = type(mod)

    def __getattr__(self, attr: str):
        param = self.__dict__["_parameters"].get(attr)
        if sk.recording and param is not None and param.device.type == "meta":
            self.__class__ = cls
            sk.load(self, name, recurse=False)
            sk.loaded_outside.append(self)
        return cls.__getattr__(self, attr)

    mod.__class__ = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__})


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
    block: int = 0  # the index of the block in the stack that the forward called

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
    """Records each call of block `index` and passes the hidden states on (shaped by `form`); without `form` the first
    call stops the forward."""

    def __init__(self, index: int, calls: list, form):
        super().__init__()
        self.index, self.calls, self.form = index, calls, form

    def forward(self, *args, **kwargs):
        hidden, call = split_hidden(args, kwargs)
        call.block = self.index
        self.calls.append((hidden, call))
        if self.form is None:
            raise _Stop
        return self.form(hidden)


def _forward_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _stop_after_blocks(sk: Skeleton, calls: list, stopped: list) -> list:
    """Hooks stopping the forward at the first call of a module with weights outside the stack once a block ran
    (the final norm, a head: nothing the statistics need); they run before that module loads anything."""
    ancestors = {sk.blocks_name.rsplit(".", k)[0] for k in range(1, sk.blocks_name.count(".") + 1)} | {""}

    def stop(name):
        def hook(module, args):
            if calls:
                stopped.append(name)
                raise _Stop
        return hook

    return [mod.register_forward_pre_hook(stop(name), prepend=True) for name, mod in _outside(sk)
            if name not in ancestors]


def _run_forward(sk: Skeleton, batch: Batch) -> None:
    sk.recording = True
    try:
        sk.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **_forward_kwargs(sk.model))
    except _Stop:
        pass
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
        raise LplrError(f"{type(sk.model).__name__}'s forward uses a weight before its first block in a way "
                        f"calibrate cannot load ({str(e).splitlines()[0][:120]}); calibrate does not support this "
                        f"architecture") from None
    finally:
        sk.recording = False


def record_calls(sk: Skeleton, batch: Batch, form=None) -> tuple[torch.Tensor, list[BlockCall]]:
    """Run the model's forward on `batch` with stand-ins for the blocks: (the first block call's hidden states, every
    block call in order, each with its block index). Without `form` the forward stops at the first block call (only
    that call is returned); with it, the calls are checked (see the module docstring)."""
    originals = list(sk.blocks)
    calls: list = []
    stopped: list[str] = []
    for i in range(len(originals)):
        sk.blocks[i] = _StandIn(i, calls, form)
    handles = _stop_after_blocks(sk, calls, stopped) if form is not None else []
    try:
        _run_forward(sk, batch)
    finally:
        for h in handles:
            h.remove()
        for i, block in enumerate(originals):
            sk.blocks[i] = block
    if not calls:
        raise LplrError(f"{type(sk.model).__name__}'s forward did not call any block of {sk.blocks_name}; calibrate "
                        f"needs every block to run")
    if form is not None:
        _check_calls(sk, calls, stopped)
    _check_not_meta(sk, calls)
    return calls[0][0], [c for _, c in calls]


def _check_calls(sk: Skeleton, calls: list, stopped: list[str]) -> None:
    """Every block ran, the calls of each block are consecutive, and each call gets the hidden states the previous
    one passed on."""
    arch, order = type(sk.model).__name__, [c.block for _, c in calls]
    done: set[int] = set()
    for k, b in enumerate(order):
        if b in done and order[k - 1] != b:
            raise LplrError(f"{arch}'s forward calls block {b} of {sk.blocks_name} again after block {order[k - 1]}; "
                            f"calibrate needs the calls of each block to be consecutive")
        done.add(b)
    missing = sorted(set(range(len(sk.blocks))) - done)
    if missing:
        where = f" (it calls {stopped[0]} after block {order[-1]}, between its blocks)" if stopped else ""
        raise LplrError(f"{arch}'s forward did not reach block {missing[0]} of {sk.blocks_name}{where}; calibrate "
                        f"needs every block to run, one after the other")
    for k in range(1, len(calls)):
        before, now = calls[k - 1][0], calls[k][0]
        if now is not before and not (now.shape == before.shape and torch.equal(now, before)):
            raise LplrError(f"{arch}'s forward changes the hidden states between block {order[k - 1]} and block "
                            f"{order[k]} of {sk.blocks_name}; calibrate runs the blocks back to back, so it does not "
                            f"support this architecture")


def _tensors(value, where: str):
    """(where, tensor) of every tensor in a call argument (tensors, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{where}[{k!r}]")


def _check_not_meta(sk: Skeleton, calls: list) -> None:
    """No recorded argument is a meta tensor (computed from a weight the forward used without loading it)."""
    for hidden, call in calls:
        args = [("hidden states", hidden), *((f"argument {i + 1}", a) for i, a in enumerate(call.args)),
                *((k, v) for k, v in call.kwargs.items())]
        for name, value in args:
            for where, t in _tensors(value, name):
                if t.device.type == "meta":
                    raise LplrError(f"{type(sk.model).__name__}'s forward gives block {call.block} a tensor computed "
                                    f"from weights calibrate did not load ({where} is on the meta device); calibrate "
                                    f"does not support this architecture")
