"""Output (activation-weighted) error: tr((W - W_hat) H (W - W_hat)^T) with H = E[x x^T] the input second moment.

For a PSD H every row d of the difference contributes d H d^T >= 0, so row blocks summed in float64 do not cancel
against each other; the float64 product D H matters because d can lie mostly in H's small-eigenvalue directions,
where a float32 product would be all round-off.
"""

from __future__ import annotations

import torch

__all__ = ["loss_weight", "weighted_error", "weighted_relative_error"]


def _block_rows(n: int, elements: int = 1 << 20) -> int:
    return max(1, elements // max(1, n))


def _quad(D: torch.Tensor, H64: torch.Tensor) -> torch.Tensor:
    """tr(D H D^T) for a float64 block D (0-d float64)."""
    return ((D @ H64) * D).sum()


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr((W - W_hat) H (W - W_hat)^T) as a 0-d float64 tensor, computed in float64 row blocks on W's device."""
    H64 = H.to(torch.float64)
    acc = torch.zeros((), dtype=torch.float64, device=W.device)
    step = _block_rows(W.shape[1])
    for i in range(0, W.shape[0], step):
        acc += _quad(W[i:i + step].double() - W_hat[i:i + step].double(), H64)
    return acc


def weighted_relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """sqrt(weighted_error / tr(W H W^T)) as a 0-d float64 tensor (0 when both vanish, e.g. H = 0). A numerically
    indefinite H can make a tiny numerator negative by round-off; it is clamped at 0."""
    H64 = H.to(torch.float64)
    num = torch.zeros((), dtype=torch.float64, device=W.device)
    den = torch.zeros((), dtype=torch.float64, device=W.device)
    step = _block_rows(W.shape[1])
    for i in range(0, W.shape[0], step):
        w = W[i:i + step].double()
        num += _quad(w - W_hat[i:i + step].double(), H64)
        den += _quad(w, H64)
    return (num.clamp_min(0) / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def loss_weight(W: torch.Tensor, H: torch.Tensor, s: torch.Tensor) -> float:
    """sum_o s_o (W H W^T)_oo: to second order, the loss increase per token of a relative output error of 1 spread
    over the rows of W (out x in) as their outputs are (row o's squared error e^2 (W H W^T)_oo), each row's squared
    error weighed by s_o, the expected squared loss gradient of output o (`calibration.sensitivity`); H = E[x x^T]."""
    H = H.to(W.dtype)  # in W's dtype (a float64 copy of a 28672-wide H would be 6.6 GB), summed in float64
    acc = torch.zeros((), dtype=torch.float64, device=W.device)
    step = _block_rows(W.shape[1])
    for i in range(0, W.shape[0], step):
        w = W[i:i + step]
        acc += (s[i:i + step].double() * ((w @ H) * w).sum(1, dtype=torch.float64)).sum()
    return float(acc)
