"""GPTQ (Frantar et al. 2022): quantize W column by column, feeding each column's error forward through H^-1.

With H = E[x x^T] (in x in) the input second moment, GPTQ greedily reduces tr((W - W_hat) H (W - W_hat)^T):
dead inputs (H_ii = 0) get H_ii = 1 and a zero column of W; H gets `damp * mean(diag H)` on its diagonal; U is the
upper Cholesky factor of H^-1 (H^-1 = U^T U). Columns i = 0..n-1 in order: q_i = Q(w_i), err_i = (w_i - q_i) / U_ii,
w_j -= err_i U_ij for j > i, applied lazily: within a block of `block_size` columns at once, beyond it by one matrix
product per block. Then W - W_hat = E U (E the matrix of the err_i), and since U H U^T = I,
tr((W - W_hat) H (W - W_hat)^T) = ||E||_F^2 for the damped H (`GPTQResult.feedback`).

Parameters: tensor and channel granularity are fitted from W up front; group parameters are fitted from the updated
weights when the group's first column is reached (blocks are cut at group starts, so every earlier error has reached
the group by then). With `act_order`, columns are processed by decreasing H_ii and every group's parameters are fitted
up front in the original column order (static groups), so the result is plain group quantization without g_idx.

Precision: H is factored in float64, in place (at most two n x n float64 matrices: 256 MiB at n = 4096, 1.9 GiB at
n = 11008): after damping its condition number can reach (n + 0.01) / 0.01 ~ 100 n, which float32 (eps 6e-8) would
resolve to about two digits at n = 4096. The weight updates run in float32 (float64 for float64 W).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import torch

from . import quantize as qz

__all__ = ["GPTQFactor", "GPTQResult", "gptq", "gptq_detailed", "gptq_factor"]


class GPTQResult(NamedTuple):
    """`quantized` decodes (`qz.dequantize`) exactly to `w_hat`; `feedback` = sum of err_i^2 = tr(D H' D^T) for
    D = W' - w_hat, W' = W with dead columns zeroed and H' the damped H (0-d float64; None for float casts)."""

    quantized: qz.Quantized
    w_hat: torch.Tensor
    feedback: torch.Tensor | None


def _check(W: torch.Tensor, H: torch.Tensor, spec: qz.QuantSpec, damp: float, block_size: int) -> None:
    if W.dim() != 2 or not W.dtype.is_floating_point:
        raise ValueError(f"gptq expects a 2-D float weight, got shape {tuple(W.shape)} ({W.dtype})")
    n = W.shape[1]
    if tuple(H.shape) != (n, n):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({n}, {n}) for a weight of shape {tuple(W.shape)}")
    if tuple(spec.shape) != tuple(W.shape):
        raise ValueError(f"quantizer spec is for shape {tuple(spec.shape)}, the weight has {tuple(W.shape)}")
    if not block_size >= 1 or not damp >= 0:
        raise ValueError(f"gptq needs block_size >= 1 and damp >= 0, got {block_size} and {damp}")


def _damped(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copy of H with dead inputs (H_ii = 0) set to H_ii = 1, then damp * mean(diag) added to the diagonal;
    and the dead mask."""
    H64 = H.to(torch.float64, copy=True)
    diag = H64.diagonal()
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(damp * diag.mean())
    return H64, dead


def _factor(H: torch.Tensor, damp: float, act_order: bool,
            work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(U, dead, perm): U upper triangular (in `work`) with H'^-1 = U^T U for the damped H' in processing order
    (`perm`: decreasing H'_ii with act_order, else None).

    One float64 Cholesky factorization and one triangular solve, instead of factor, invert, factor: with J the
    reversal and J H' J = L L^T, H'^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a positive
    diagonal, hence (by uniqueness) the upper Cholesky factor of H'^-1. In place: at most two n x n float64 matrices.
    """
    H64, dead = _damped(H, damp)
    n = H64.shape[0]
    perm = torch.argsort(H64.diagonal(), descending=True, stable=True) if act_order else None
    rev = (torch.arange(n, device=H64.device) if perm is None else perm).flip(0)
    H64 = H64[rev.unsqueeze(1), rev]
    info = torch.empty((), dtype=torch.int32, device=H64.device)
    L, info = torch.linalg.cholesky_ex(H64, out=(H64, info))
    if int(info):  # the one host sync of the factorization
        raise ValueError("H + damp * mean(diag H) * I is not positive definite; pass a larger damp")
    eye = torch.eye(n, dtype=L.dtype, device=L.device)
    X = torch.linalg.solve_triangular(L, eye, upper=False, out=eye)
    del L, H64
    return X.to(work).flip(0, 1), dead, perm


class GPTQFactor(NamedTuple):
    """What GPTQ derives from H alone (`gptq_factor`): U (upper triangular, H'^-1 = U^T U in processing order, in the
    working precision `work`), the dead-input mask and the processing order (None without act_order). Every weight
    quantized against the same H with the same damp and order shares it (q/k/v, a qlr's backbone and its R)."""

    U: torch.Tensor
    dead: torch.Tensor
    perm: torch.Tensor | None
    damp: float
    act_order: bool
    work: torch.dtype


def gptq_factor(H: torch.Tensor, *, damp: float = 0.01, act_order: bool = False,
                work: torch.dtype = torch.float32) -> GPTQFactor:
    """The factorization of H that `gptq` would compute (one float64 Cholesky and triangular solve, O(n^3)), to pass
    to `gptq(..., factor=)` for several weights with the same H: same result, bit for bit, as computing it each time.
    ValueError when the damped H is not positive definite or damp < 0."""
    if tuple(H.shape) != (H.shape[0], H.shape[0]) or not damp >= 0:
        raise ValueError(f"gptq_factor needs a square H and damp >= 0, got shape {tuple(H.shape)} and {damp}")
    return GPTQFactor(*_factor(H, damp, act_order, work), damp, act_order, work)


def _blocks(n: int, block_size: int, group_size: int | None) -> list[tuple[int, int]]:
    """Column blocks of at most block_size, also cut at every group start when groups are fitted on the fly."""
    cuts = set(range(0, n, block_size)) | (set(range(0, n, group_size)) if group_size else set())
    edges = sorted(cuts) + [n]
    return list(itertools.pairwise(edges))


class _Columns:
    """Per-column grids in processing order: static (fitted up front) or fitted at each group start."""

    def __init__(self, Wt: torch.Tensor, spec: qz.QuantSpec, perm: torch.Tensor | None,
                 params: qz.QParams | None = None):
        self.spec, self.dynamic = spec, spec.granularity == "group" and perm is None and params is None
        self.groups: list[qz.QParams] = []
        if self.dynamic:
            return
        if params is not None:  # kept: the stored parameters given, in the scale layout
            self.params, grid = params, qz.grid_of(params, spec, Wt.dtype)
        else:  # from W in the original column order (Wt is not permuted yet), laid out as `quantize_spec` sees it
            self.params, grid = qz.fit_grid(Wt.T.contiguous(), spec)
        order = torch.arange(Wt.shape[0], device=Wt.device) if perm is None else perm
        index = order // spec.group_size if spec.granularity == "group" else order
        self.grid_t = grid.map(lambda t: t.T)  # (columns of parameters, rows)
        self.index = None if grid.scale.shape[1] == 1 else index

    def block(self, Wt: torch.Tensor, i1: int, i2: int) -> qz.Grid:
        """Grid of columns i1..i2 (processing order), one row of parameters per column."""
        count = i2 - i1
        if self.dynamic:
            if i1 % self.spec.group_size == 0:
                group = Wt[i1:i1 + self.spec.group_size].T.contiguous()  # the group's updated weights
                params, grid = qz.fit_grid(group, self.spec)
                self.groups.append(params)
                self.current = grid.map(lambda t: t.T)
            return self.current.map(lambda t: t.expand(count, -1))
        if self.index is None:
            return self.grid_t.map(lambda t: t.expand(count, -1))
        idx = self.index[i1:i2]
        return self.grid_t.map(lambda t: t[idx])

    def stored(self) -> qz.QParams:
        if not self.dynamic:
            return self.params
        return qz.QParams(*(None if ts[0] is None else torch.cat(ts, dim=1)
                            for ts in zip(*((p.scale, p.zero, p.zero_point) for p in self.groups), strict=True)))


def _quantize_block(Wt1: torch.Tensor, U1: torch.Tensor, grid: qz.Grid, codes1: torch.Tensor) -> torch.Tensor:
    """GPTQ on the rows (= columns of W) of the block Wt1, in place: each row becomes its quantized values, its codes
    go to codes1, later rows of the block absorb its error. Returns the errors err_i (one row each)."""
    err_rows = torch.empty_like(Wt1)
    for i in range(Wt1.shape[0]):
        g = grid.map(lambda t, i=i: t[i])
        w = Wt1[i]
        t = g.codes(w)
        codes1[i].copy_(t)
        q = g.values_(t)
        err = torch.sub(w, q, out=err_rows[i]).div_(U1[i, i])
        w.copy_(q)
        Wt1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
    return err_rows


def _run(W: torch.Tensor, H: torch.Tensor, spec: qz.QuantSpec, damp: float, block_size: int,
         act_order: bool, factor: GPTQFactor | None, params: qz.QParams | None = None) -> GPTQResult:
    m, n = W.shape
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wt = torch.empty((n, m), dtype=work, device=W.device).copy_(W.T)  # row j = column j of W
    U, dead, perm = factor[:3] if factor is not None else _factor(H, damp, act_order, work)
    Wt[dead] = 0
    columns = _Columns(Wt, spec, perm, params)
    if perm is not None:
        Wt = Wt[perm]
    codes_t = torch.empty((n, m), dtype=torch.uint8, device=W.device)
    feedback = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1, i2 in _blocks(n, block_size, spec.group_size if columns.dynamic else None):
        grid = columns.block(Wt, i1, i2)
        err = _quantize_block(Wt[i1:i2], U[i1:i2, i1:i2], grid, codes_t[i1:i2])
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err, alpha=-1)
        feedback += err.square().sum(dtype=torch.float64)
    if perm is None:
        codes, w_hat = codes_t.T.contiguous(), Wt.T.contiguous()
    else:
        inv = torch.argsort(perm)
        codes, w_hat = codes_t.T[:, inv], Wt.T[:, inv]
    p = columns.stored()
    return GPTQResult(qz.Quantized(spec, codes, p.scale, p.zero, p.zero_point), w_hat, feedback)


def gptq_detailed(W: torch.Tensor, H: torch.Tensor, spec: qz.QuantSpec, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, factor: GPTQFactor | None = None,
                  params: qz.QParams | None = None) -> GPTQResult:
    """GPTQ of W (m x n, out x in) against H (n x n, symmetric PSD, may be singular) with any integer `spec`
    (16/32 bits: the float cast). w_hat is float32 (float64 for float64 W) and equals `qz.dequantize(quantized,
    w_hat.dtype)` bit for bit; quantized.spec says what is stored (scale_dtype float32 where float16 scales do not
    fit, see `quantize`). Raises ValueError for inconsistent shapes or when damp = 0 leaves H singular. `factor`:
    `gptq_factor` of this H with the same damp and act_order (and W's working precision), computed once for several
    weights; the result is the same bit for bit. `params`: a grid to keep instead of fitting one (the stored
    parameters of an earlier quantization under `spec`, e.g. of a nearby matrix; every column is then coded against
    them, as static groups are)."""
    _check(W, H, spec, damp, block_size)
    if factor is not None and (factor.damp, factor.act_order, factor.work, factor.U.shape[0]) != (
            damp, act_order, torch.float64 if W.dtype == torch.float64 else torch.float32, W.shape[1]):
        raise ValueError("the GPTQ factor was computed with other settings (damp, act_order, precision or width)")
    if spec.bits in qz.FLOAT_BITS:
        q = qz.quantize_spec(W, spec)
        return GPTQResult(q, qz.dequantize(q, torch.float64 if W.dtype == torch.float64 else torch.float32), None)
    result = _run(W, H, spec, damp, block_size, act_order, factor, params)
    if params is None and not qz.scales_representable(result.quantized.scale, spec):
        result = _run(W, H, dataclasses.replace(spec, scale_dtype="float32"), damp, block_size, act_order, factor)
    return result


def gptq(W: torch.Tensor, H: torch.Tensor, spec: qz.QuantSpec, *, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, factor: GPTQFactor | None = None,
         params: qz.QParams | None = None) -> tuple[qz.Quantized, torch.Tensor]:
    """(quantized, w_hat) of `gptq_detailed`."""
    result = gptq_detailed(W, H, spec, damp=damp, block_size=block_size, act_order=act_order, factor=factor,
                           params=params)
    return result.quantized, result.w_hat
