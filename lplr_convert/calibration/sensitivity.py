"""`calibrate --sensitivity-samples N`: how much the model's next-token loss cares about each output channel of each
block linear, for spending a global bit budget where it buys most (`pipeline.allocation`).

For a linear y = W x inside the model, a small change D of W moves y by D x, and the summed next-token loss L by about
1/2 (D x)^T F (D x) to second order (the first-order term averages out near a trained optimum), with F the Fisher
information of L with respect to y. Keeping only F's diagonal, estimated by the squared gradients g_o^2 = (dL/dy_o)^2
over the calibration tokens (the empirical Fisher, as HAWQ, SqueezeLLM and OWQ use), the loss increase per token is

    sum_o s_o ||D_o x||^2,   s_o = E[g_o^2]  (per output channel o, averaged over tokens),

and with each row's error about proportional to its output (relative error e: ||D_o x||^2 ~ e^2 (W H W^T)_oo, H the
input second moment) it is e^2 sum_o s_o (W H W^T)_oo. The allocator weighs each tensor's estimated relative squared
output error by that sum instead of by its parameter count.

This pass runs the whole model forward and backward (the model in float32 on the calibration device, one sample of
`seq_len` tokens at a time), so it needs the model to fit there, unlike the block-by-block statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from .. import constants as C
from ..errors import LplrError, opt
from ..io.writer import write_tensors_atomic
from .moments import linear_types

__all__ = ["measure_sensitivity", "output_sensitivity", "save_sensitivity"]


def output_sensitivity(model: torch.nn.Module, seqs: list[list[int]], names: dict[str, str],
                       device: torch.device | str) -> tuple[dict[str, torch.Tensor], int]:
    """({names[module]: mean over tokens of the squared gradient of the summed next-token cross-entropy with respect
    to that linear module's output, per output channel (float32, CPU)}, tokens scored) of a causal LM over `seqs`
    (token id lists, one forward and backward each). `names` maps the model's linear module names to the names the
    result uses; modules it lacks are not measured. No parameter keeps a gradient (the input embeddings hold one
    while a sample runs)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def forward(module, inputs, output):
            def backward(grad: torch.Tensor) -> None:
                g = grad.detach().reshape(-1, grad.shape[-1]).double()
                sums[name] = sums.get(name, 0) + g.square().sum(0)
                counts[name] = counts.get(name, 0) + g.shape[0]

            if output.requires_grad:
                output.register_hook(backward)
        return forward

    handles = [m.register_forward_hook(hook(names[n])) for n, m in model.named_modules()
               if n in names and isinstance(m, linear_types())]
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    # only the input embeddings take a gradient, so that the backward reaches every block and no other parameter
    # holds a gradient's memory
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    tokens = 0
    try:
        for seq in tqdm(seqs, desc="sensitivity", unit="sample"):
            ids = torch.tensor([seq], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            loss.backward()
            embedding.grad = None
            tokens += len(seq) - 1
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
    return {n: (sums[n] / counts[n]).float().cpu() for n in sums}, tokens


def measure_sensitivity(root: Path, seqs: list[list[int]], to_ckpt: dict[str, str], weights: set[str],
                        device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """`output_sensitivity` of the causal LM in `root` (built by transformers, float32, on `device`) for the linears
    whose checkpoint weight names (`to_ckpt`: model parameter name -> checkpoint name) are in `weights`, keyed by
    those checkpoint names."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(root, local_files_only=True, dtype=torch.float32).to(device)
    except Exception as e:  # noqa: BLE001  (OSError, ValueError, ... from transformers)
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LplrError(f"{opt('sensitivity_samples')} runs the whole model, which transformers cannot build from "
                        f"{root} ({why}); calibrate without it") from None
    names = {}
    for n, _ in model.named_modules():
        ckpt = to_ckpt.get(f"{n}.weight")
        if ckpt in weights:
            names[n] = ckpt
    result, tokens = output_sensitivity(model, seqs, names, device)
    missing = sorted(weights - set(result))
    if missing:
        logger.warning(f"{len(missing)} weight(s) got no sensitivity (first: {missing[0]}): the loss does not reach "
                       f"them; the budget weighs them as a typical tensor of their size")
    return result, tokens


def save_sensitivity(out: Path, sensitivity: dict[str, torch.Tensor]) -> dict:
    """Write the vectors as `lplr_sensitivity.safetensors` (atomically, hashed while written); returns its record."""
    items = sorted((f"{name.removesuffix('.weight')}.{C.CALIB_SENSITIVITY_SUFFIX}", t.contiguous())
                   for name, t in sensitivity.items())
    return write_tensors_atomic(out / C.CALIB_SENSITIVITY_FILE, items, {C.META_FORMAT_KEY: C.META_FORMAT_VALUE})
