"""Truncation-aware whitening (SVD-LLM): low-rank factors that minimise the output error tr(D H D^T), D = W - L R.

With H = S S^T (S lower triangular), tr(D H D^T) = ||D S||_F^2, so the rank-r problem is Eckart-Young for W S: the
top-r SVD U_r Sigma_r V_r^T of W S gives L = U_r Sigma_r and R = V_r^T S^-1, whose error is sum_{i>r} sigma_i(W S)^2.

For a fixed L the weighted objective is minimised by the unweighted least-squares R (the gradient is
-2 L^T (W - L R) H, and L^T (W - L R) = 0 makes it vanish for any H; for a positive-definite H that is the only
minimiser). So LPLR's and LSVD's refit `solve_normal(L, W)` stays valid; what H changes is the left basis (and how the
factors should be quantized). The same identity gives R = V_r^T S^-1 = (L^T L)^-1 L^T W without applying S^-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lstsq import solve_normal
from .sketch import sketch_matrix
from .svd import singular_values, truncated_svd

__all__ = ["Whitening", "whitened_singular_values", "whitened_sketch_basis", "whitened_svd", "whitening"]

# Default regularisation, relative to the mean diagonal of H: see `whitening`.
DEFAULT_EPS = 1e-6
_MAX_EPS = 1e-2


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Whitening:
    """S (n x n, lower triangular, float64, on H's device) with S S^T = H + shift * I."""

    S: torch.Tensor
    shift: float  # 0.0 when H itself was positive definite

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """X S (X: k x n), in X's working precision (float32, or float64 for float64 X)."""
        dtype = work_dtype(X.dtype)
        return X.to(dtype) @ self.S.to(dtype)

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """X S^-1 (X: k x n) by a float64 triangular solve (no inverse formed), returned in X's working precision.
        Its accuracy degrades with cond(S) = sqrt(cond(H + shift I)); the factorizations here never need it."""
        Y = torch.linalg.solve_triangular(self.S, X.to(torch.float64), upper=False, left=False)
        return Y.to(work_dtype(X.dtype))


def _check_hessian(H: torch.Tensor) -> torch.Tensor:
    """H as a symmetrised float64 square matrix (calibration accumulators are symmetric only up to round-off)."""
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"H must be a non-empty square matrix, got shape {tuple(H.shape)}")
    H64 = H.to(torch.float64)
    return (H64 + H64.mT) / 2


def whitening(H: torch.Tensor, eps: float = DEFAULT_EPS) -> Whitening:
    """Lower S with S S^T = H + shift I in float64; shift = 0 when the Cholesky factorization of H succeeds.

    Otherwise (H singular, e.g. dead inputs with zero rows and columns, or numerically indefinite from round-off)
    shift = max(-lambda_min(H), 0) + eps * mean(diag H), retried with eps x10 up to 1e-2 if the factorization still
    fails. eps is relative so that it does not depend on the activations' scale (SVD-LLM's absolute 1e-6, which its
    users raise to 1e-3 on large models, is below the round-off of eigvalsh once the entries of H reach ~1e4). The
    default 1e-6 clears eigvalsh's absolute error (~ n * eps64 * lambda_max) for n up to ~10^4 and lambda_max / mean
    diagonal up to 10^4; it changes the objective by at most shift * ||D||_F^2, and the inputs it lifts (dead or
    nearly dead, with no weight in the objective) get a whitened weight sqrt(shift), so that the SVD ignores them.
    H = 0 (no signal: every approximation has zero output error) gives S = I with shift = 1, i.e. plain SVD.
    One host sync, plus one per retry on the regularised path. ValueError for a non-finite or non-PSD-looking H.
    """
    if not 0 < eps <= _MAX_EPS:
        raise ValueError(f"eps={eps!r} must be in (0, {_MAX_EPS}]")
    H64 = _check_hessian(H)
    mean_diag, finite, any_nonzero = torch.stack(
        [H64.diagonal().mean(), torch.isfinite(H64).all().double(), (H64 != 0).any().double()]).tolist()
    if not finite:
        raise ValueError("H has non-finite entries")
    if not any_nonzero:
        return Whitening(torch.eye(H64.shape[0], dtype=torch.float64, device=H64.device), 1.0)
    if mean_diag <= 0:
        raise ValueError(f"H is not positive semi-definite: its mean diagonal is {mean_diag:.3g}")
    chol, info = torch.linalg.cholesky_ex(H64)
    if int(info) == 0:
        return Whitening(chol, 0.0)
    lam_min = float(torch.linalg.eigvalsh(H64)[0])
    rel = eps
    while rel <= _MAX_EPS:
        shift = max(-lam_min, 0.0) + rel * mean_diag
        chol, info = torch.linalg.cholesky_ex(H64 + shift * torch.eye(H64.shape[0], dtype=H64.dtype, device=H64.device))
        if int(info) == 0:
            return Whitening(chol, shift)
        rel *= 10
    raise ValueError(f"H + shift I stays indefinite up to shift = {shift:.3g} (lambda_min {lam_min:.3g})")


def whitened_svd(W: torch.Tensor, white: Whitening, r: int, method: str = "auto", seed: int = 0,
                 oversample: int = 10, power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R), L = U_r Sigma_r (m x r) and R = V_r^T S^-1 (r x n) from the top-r SVD of W S, in W's working precision.

    Minimises tr((W - L R) H (W - L R)^T) over rank-r products when S S^T = H (shift 0; otherwise it is the optimum
    for H + shift I). W S is formed once (m n^2) and its SVD taken by `truncated_svd`'s route `method`. R is computed
    as the least-squares refit (L^T L)^-1 L^T W, which equals V_r^T S^-1 (module docstring) without S^-1: it stays
    accurate however ill-conditioned S is, and L R is exactly the refit of W on the whitened-optimal left basis.
    """
    Wf = W.to(work_dtype(W.dtype))
    A = white.apply(Wf)
    U, s, Vh = truncated_svd(A, r, method, seed=seed, oversample=oversample, power_iters=power_iters)
    del Vh, A
    L = U.mul_(s)
    return L, solve_normal(L, Wf).R


def whitened_singular_values(W: torch.Tensor, white: Whitening) -> torch.Tensor:
    """All min(m, n) singular values of W S, descending, float64 (precise Gram). sum_{i>r} sigma_i^2 is the output
    error of the best rank-r approximation (for H + shift I)."""
    return singular_values(white.apply(W))


def whitened_sketch_basis(W: torch.Tensor, white: Whitening, r: int, seed: int, kind: str = "gaussian",
                          power_iters: int = 0) -> torch.Tensor:
    """LPLR's left basis in the whitened space: Y = (W S) Omega (m x r) with Omega = `sketch_matrix(n, r, seed, kind)`,
    in W's working precision, computed as W (S Omega) (never forming W S).

    Power iterations replace span(Y) by span((W S)(W S)^T Y) = span(W (S (S^T (W^T Y)))), re-orthonormalised each time
    (as LPLR's unwhitened iterations). The refit for a fixed L is the unweighted `solve_normal(L, W)` (module
    docstring), so only this basis changes against plain LPLR.
    """
    Wf = W.to(work_dtype(W.dtype))
    S = white.S.to(Wf.dtype)
    omega = sketch_matrix(Wf.shape[1], r, seed, kind, dtype=Wf.dtype, device=Wf.device)
    Y = Wf @ (S @ omega)
    del omega
    for _ in range(power_iters):
        Y, _ = torch.linalg.qr(Wf @ (S @ (S.T @ (Wf.T @ Y))))
    return Y
