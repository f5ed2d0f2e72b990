"""Least squares min_R ||L R - W||_F without an explicit pseudo-inverse.

Normal equations solved by a Cholesky factorization G = L^T L = C C^T. G and L^T W are formed, and C computed, in the
working precision (GEMM speed); when the Cholesky diagonal shows L too ill-conditioned for that precision, they are
re-formed in float64 (row blocks, no full float64 copy of W). A diagonal shift grows from the round-off level when L
is numerically rank-deficient, and a float64 pseudo-inverse is the last resort.

When L is a quantized matrix of at most 8 bits with one scale per column (`quantize.column_affine`), G and L^T W come
from integer products of its codes (`code_gram`, `code_cross`: exact int8 sums, torch._int_mm, formed in float64), on
a CPU with VNNI int8 kernels. They are at least as accurate as the float32 products and faster: 0.24 s against 0.73 s
and 0.8 s against 1.4 s for an 11008 x 3277 L and an 11008 x 4096 W on the 2-core AVX-512 machine of the benchmark.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .quantize import Quantized, column_affine

__all__ = ["NormalSolution", "code_cross", "code_gram", "gram", "integer_matmul", "solve_normal"]

# Re-form the normal equations in float64 when eps(dtype) * cond(G) exceeds this (cond estimated from Cholesky).
_REFINE_ABOVE = 1e-4


@dataclass
class NormalSolution:
    """R with the products the error identity reuses: gram = L^T L and cross = L^T W, in the precision they were
    formed in (the working dtype, or float64 when the normal equations had to be re-formed)."""

    R: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    shift: float  # diagonal shift that was needed (0.0 for a well-conditioned L)
    precision: str  # "working" or "float64"
    chol: torch.Tensor | None = None  # lower C with C C^T = gram (None when the pseudo-inverse was needed)


def gram(L: torch.Tensor, blocks: int = 4, min_rank: int = 1024, mm=torch.matmul) -> torch.Tensor:
    """L^T L computing only the block upper triangle (0.625x the flops of a full product for 4 blocks).

    Each entry is the same dot product over the rows as in `mm(L.T, L)`; the lower blocks are mirrored. `mm`:
    the matrix product (torch._int_mm for int8 L, whose Gram is int32).
    """
    r = L.shape[1]
    if r < min_rank:
        return mm(L.T, L)
    edges = [round(i * r / blocks) for i in range(blocks + 1)]
    G = None
    for a, b in itertools.pairwise(edges):
        blk = mm(L[:, a:b].T, L[:, a:])
        if G is None:
            G = torch.empty(r, r, dtype=blk.dtype, device=L.device)
        G[a:b, a:] = blk
        G[a:, a:b] = blk.T
    return G


# Rows per integer Gram: a sum of 2**16 products of int8 codes (|c| <= 128) stays within int32.
_INT_ROWS = 1 << 16


def integer_matmul(device: torch.device | str) -> bool:
    """torch._int_mm is fast on `device`: a CPU with VNNI int8 instructions. (CUDA has int8 products too, with shape
    constraints this code does not meet in general; it keeps the float32 Gram there.)"""
    device = torch.device(device)
    return device.type == "cpu" and bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """t with the strides (columns, 1) of a fresh row-major matrix. `contiguous()` is not enough: it keeps any stride
    of a dimension of size 1 (a 1 x 3 transpose of a 3 x 1 matrix keeps strides (1, 1))."""
    if t.stride() == (t.shape[1], 1):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm (int8 x int8 -> exact int32) on row-major operands: on other strides it can return wrong sums
    (the 1 x 3 transpose of a 3 x 1 matrix, strides (1, 1), gave 1113702368 for 34194 here, torch 2.13 CPU)."""
    return torch._int_mm(_row_major(a), _row_major(b))


def _column_sums(X: torch.Tensor, dtype: torch.dtype, block_elements: int = 1 << 22) -> torch.Tensor:
    """1^T X in `dtype`, a block of rows at a time (X.sum(0, dtype=...) would first convert all of X to `dtype`)."""
    acc = torch.zeros(X.shape[1], dtype=dtype, device=X.device)
    step = max(1, block_elements // max(1, X.shape[1]))
    for i in range(0, X.shape[0], step):
        acc += X[i:i + step].sum(0, dtype=dtype)
    return acc


def _centered_codes(q: Quantized) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(C, s, u) with dequantize(q) = C diag(s) + 1 u^T column by column: C the codes less 128 as int8, s and u float64
    on the codes' device (u = z + 128 s for `column_affine`'s (s, z)); None where the integer products do not apply
    (more than 8 bits, scales per row or group, float casts, no rows, no fast integer product)."""
    if q.spec.bits > 8 or not q.codes.numel() or not integer_matmul(q.codes.device):
        return None
    affine = column_affine(q)
    if affine is None:
        return None
    s, z = (t.to(q.codes.device) for t in affine)
    return torch.bitwise_xor(q.codes, 128).view(torch.int8), s, z + 128 * s  # uint8 c -> int8 c - 128


def code_gram(q: Quantized, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """L^T L for L = dequantize(q), from the exact integer Gram of q's codes, in `dtype` (formed in float64, rounded
    once), or None where that does not apply (more than 8 bits, scales per row or group, float casts, no fast
    integer product).

    With C the codes less 128 (int8) and L = C diag(s) + 1 u^T column by column (u = z + 128 s for
    `column_affine`'s (s, z)): L^T L = diag(s) C^T C diag(s) + (s * v) u^T + u (s * v)^T + m u u^T, v = C^T 1.
    C^T C is exact (int32 sums of row blocks of 2**16), so G carries only float64 rounding; it is the Gram of the
    exact affine values, which dequantize's float32 L rounds once more per entry. Assembled a block of rows at a
    time (no float64 r x r temporary beyond the integer Gram's own size), symmetric bit for bit.
    """
    centered = _centered_codes(q)
    if centered is None:
        return None
    C, s, u = centered
    m, r = C.shape
    K = gram(C[:_INT_ROWS], mm=_int_mm)  # int32; the sum of several row blocks in int64
    for i in range(_INT_ROWS, m, _INT_ROWS):
        K = K.long() if K.dtype == torch.int32 else K
        K += gram(C[i:i + _INT_ROWS], mm=_int_mm)
    sv = s * _column_sums(C, torch.int64).double()
    G = torch.empty(r, r, dtype=dtype, device=C.device)
    step = max(1, (1 << 20) // max(1, r))
    for a in range(0, r, step):
        b = min(r, a + step)
        # Each term is symmetric bit for bit: K_ij (s_i s_j), (sv_i u_j + u_i sv_j) and m (u_i u_j).
        blk = K[a:b].double().mul_(torch.outer(s[a:b], s))
        blk += torch.outer(sv[a:b], u) + torch.outer(u[a:b], sv)
        blk += torch.outer(u[a:b], u).mul_(m)
        G[a:b] = blk
    return G


# Integer limbs of W in `code_cross`: three int8 digits (base 128) of each column's fixed-point value.
_LIMBS = 3
_CROSS_BLOCK_ELEMENTS = 1 << 22  # columns of W per block: at most this many float32 temporaries (16 MiB)


def _int8_limbs(X: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(a, [N_0, N_1, N_2]) with X = (N_0 + N_1 / 128 + N_2 / 128**2) a + E column by column: a a power of two per
    column with |X| <= 127 a, N_t int8 digits (truncated: all exact float32 steps), |E| < a / 128**2 (21 bits below
    the column's largest entry; exact for a float16 column whose entries span less than 2**10)."""
    amax = X.abs().amax(dim=0, keepdim=True).double()
    a = torch.exp2(torch.ceil(torch.log2(amax.clamp_min(torch.finfo(torch.float64).tiny) / 127))).to(X.dtype)
    T = X / a
    limbs = []
    for t in range(_LIMBS):
        limbs.append(T.to(torch.int8))  # truncation towards zero
        if t + 1 < _LIMBS:
            T = T.frac_().mul_(128)
    return a.double().reshape(-1), limbs


def code_cross(q: Quantized, W: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """L^T W for L = dequantize(q) from integer products, in `dtype` (formed in float64, rounded once), or None
    where `code_gram` would be None or W is not float32/float64.

    L^T W = diag(s) C^T W + u (1^T W) (as in `code_gram`), with C^T W from W's `_int8_limbs` per block (up to 2**16
    rows by 2**22 / rows columns): three exact int8 products per block, summed exactly in float64, the row blocks'
    sums added in float64. The result is L^T W~ for W~ = W less its limb residual E (|E| < 2**-21 of the largest
    |entry| of the column within its row block), where a float32 product rounds every sum at 2**-24 relative;
    1^T W is summed in float64 from W itself. 0.8 s where the float32 product takes 1.4 s for an 11008 x 3277 L
    and an 11008 x 4096 W here; the float64 temporaries are one column block's.
    """
    centered = None if W.dtype not in (torch.float32, torch.float64) else _centered_codes(q)
    if centered is None:
        return None
    C, s, u = centered
    m, n = W.shape
    colsum = _column_sums(W, torch.float64)
    # C^T a row block at a time, each made row-major once (together the size of the codes), for every column block
    codes_t = [_row_major(C[i:i + _INT_ROWS].T) for i in range(0, m, _INT_ROWS)]
    out = torch.empty(C.shape[1], n, dtype=dtype, device=W.device)
    step = max(1, _CROSS_BLOCK_ELEMENTS // max(1, min(m, _INT_ROWS)))
    for j in range(0, n, step):
        acc = None
        for b, Ct in enumerate(codes_t):
            # Limbs of each (row block, column block) with their own scales: every block's product is exact.
            Wb = W[b * _INT_ROWS:(b + 1) * _INT_ROWS, j:j + step]
            a, limbs = _int8_limbs(Wb)
            part = _int_mm(Ct, limbs[0]).double()
            for t, N in enumerate(limbs[1:], 1):
                part.add_(_int_mm(Ct, N).double(), alpha=128.0**-t)
            part.mul_(a)
            acc = part if acc is None else acc.add_(part)
        acc.mul_(s[:, None]).add_(torch.outer(u, colsum[j:j + step]))  # one rounding each: layout-free
        out[:, j:j + step] = acc
    return out


def _gram64(L: torch.Tensor, W: torch.Tensor, block_rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    r, n = L.shape[1], W.shape[1]
    G = torch.zeros(r, r, dtype=torch.float64, device=L.device)
    B = torch.zeros(r, n, dtype=torch.float64, device=L.device)
    for i in range(0, L.shape[0], block_rows):
        lb = L[i:i + block_rows].double()
        G += gram(lb)
        B += lb.T @ W[i:i + block_rows].double()
    return G, B


def _cholesky(G: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Lower Cholesky factor of G, shifting the diagonal up from round-off level if needed."""
    chol, info = torch.linalg.cholesky_ex(G)
    if not bool(info.any()):
        return chol, 0.0
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    scale = G.diagonal().abs().max()
    rel = 1e-14
    while rel < 1e-2:
        chol, info = torch.linalg.cholesky_ex(G + (scale * rel) * eye)
        if not bool(info.any()):
            return chol, float(scale * rel)
        rel *= 10
    return None, float("inf")


def _well_conditioned(chol: torch.Tensor, info: torch.Tensor) -> bool:
    """Cholesky succeeded and eps * cond(G), estimated from C's diagonal, is below `_REFINE_ABOVE` (one host sync)."""
    d = chol.diagonal().abs()
    cond = (d.max() / d.min().clamp_min(torch.finfo(d.dtype).tiny)) ** 2
    return bool((info == 0) & (torch.finfo(chol.dtype).eps * cond < _REFINE_ABOVE))


def _solve(chol: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """G^-1 B = C^-T C^-1 B, solved from the right on transposed views (X C^T = B^T, then X' C = X): the same
    triangular solves as from the left without copying B into LAPACK's column-major order (0.14 s against 0.22 s
    per solve for a 3277 x 4096 right-hand side here)."""
    y = torch.linalg.solve_triangular(chol.mT, B.mT, upper=True, left=False)
    return torch.linalg.solve_triangular(chol, y, upper=False, left=False).mT


def solve_normal(L: torch.Tensor, W: torch.Tensor, codes: Quantized | None = None) -> NormalSolution:
    """Solve min_R ||L R - W||_F for R (r x n), L being m x r and W m x n; R comes back in L's dtype. `codes`: the
    quantized matrix L was decoded from, when there is one (its Gram may come from the codes: `code_gram`)."""
    G = None if codes is None else code_gram(codes, L.dtype)
    G = gram(L) if G is None else G
    cross = None if codes is None else code_cross(codes, W, L.dtype)
    cross = L.T @ W if cross is None else cross
    if L.dtype != torch.float64:
        chol, info = torch.linalg.cholesky_ex(G)
        if _well_conditioned(chol, info):
            return NormalSolution(_solve(chol, cross), G, cross, 0.0, "working", chol)
        del G, cross, chol
        G64, B64 = _gram64(L, W)
    else:
        G64, B64 = G, cross
    chol, shift = _cholesky(G64)
    if chol is None:
        R = torch.linalg.pinv(L.double()) @ W.double()
    else:
        R = _solve(chol, B64)
    return NormalSolution(R.to(L.dtype), G64, B64, shift, "float64", chol if shift == 0.0 else None)
