"""Incoherence processing (QuIP#, Tseng et al. 2024): a seeded randomized Hadamard transform on a weight's input and
output dimensions, W' = U W V^T, with U (m x m) and V (n x n) orthogonal, so W = U^T W' V.

The transform of width n is V = K diag(s): s random signs drawn from a seed, K a Kronecker product of small
orthogonal factors applied along the axes of x reshaped to (d, 2^a, 2^b, ...):
- n = d * 2^k with d odd; 2^k is the normalised Sylvester Hadamard H_{2^k} = H_{2^a} ⊗ H_{2^b} ⊗ ... (factors of
  at most 128, which is exactly H_{2^k}: the Sylvester construction is a Kronecker power), so a power-of-two width
  gets QuIP#'s randomized Hadamard transform exactly;
- the odd part d (9 for SmolLM2's 576, 3 for 1536 and 49152, 43 for LLaMA's 11008) gets a random orthogonal d x d
  matrix drawn from the same seed (QR of a Gaussian, signs fixed), Kronecker-multiplied with the Hadamard: every
  output coordinate mixes every input coordinate, as a full Hadamard would. QuIP# instead pairs H_{2^k} with fixed
  Hadamard matrices of order 12, 20, 28, ...; those exist only for widths 4j * 2^k (576 = 12 * 48 does not factor
  so), while a random orthogonal factor fits any odd part. A block-diagonal Hadamard over the largest power of two
  (64 for 576) was the simpler alternative, but it mixes only within blocks of 64, leaving the outliers of one
  block there.
Applying V to a vector costs n * (d + 2^a + 2^b + ...) multiply-adds in a few batched matrix products (4096: 2 x 64,
0.8 % of a 4096 x 4096 matvec; 576: 9 + 64), never a dense n x n matrix (an odd width has d = n: the only case where
the odd factor is the whole width).

Pure math: tensors in, tensors out. The signs and the odd factor are drawn on the CPU (float64) from a
`torch.Generator` seeded with the seed, so every machine builds the same transform, then cached per device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["INCOHERENCE_KINDS", "MAX_FACTOR", "Incoherence", "RandomizedHadamard", "check_seed", "sylvester"]

INCOHERENCE_KINDS = ("none", "hadamard")
MAX_FACTOR = 128  # largest Hadamard factor of the Kronecker product (one batched matmul each)


def check_seed(seed, bits: int = 63) -> int:
    """`seed` as an int in [0, 2^bits) (a tensor's seed: 63 bits, `math.sketch.derive_seed`; a generator's: 64);
    ValueError naming it otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << bits:
        raise ValueError(f"the incoherence seed {seed!r} is not an integer in [0, 2^{bits})")
    return seed


def sylvester(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of order n (a power of two): H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    H = torch.ones(1, 1, dtype=dtype, device=device)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def _split(n: int) -> tuple[int, list[int]]:
    """(odd part d, power-of-two factor sizes, each <= MAX_FACTOR, as equal as possible) with n = d * prod(sizes)."""
    k = (n & -n).bit_length() - 1
    d = n >> k
    parts = -(-k // (MAX_FACTOR.bit_length() - 1)) if k else 0
    sizes = [1 << (k // parts + (i < k % parts)) for i in range(parts)]
    return d, sizes


class RandomizedHadamard:
    """V = K diag(s) for width n from `seed` (module docstring). `apply(x)` maps each row v of x (..., n) to V v,
    `apply_t(x)` to V^T v (its inverse)."""

    def __init__(self, n: int, seed: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"a transform width must be a positive integer, got {n!r}")
        self.n, self.seed = n, check_seed(seed, 64)
        self.odd, self.sizes = _split(n)
        self._cache: dict = {}

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(signs, odd factor or None) in float64 on the CPU, from the seed alone."""
        g = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (self.n,), generator=g).double().mul_(2).sub_(1)
        odd = None
        if self.odd > 1:
            Q, R = torch.linalg.qr(torch.randn(self.odd, self.odd, generator=g, dtype=torch.float64))
            odd = (Q * torch.where(R.diagonal() < 0, -1.0, 1.0)).contiguous()  # Haar-distributed, unique given the draw
        return signs, odd

    def _tensors(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._cache:
            if "host" not in self._cache:
                self._cache["host"] = self._draw()
            signs, odd = self._cache["host"]
            hs = {b: sylvester(b, dtype, device) for b in set(self.sizes)}
            self._cache[key] = (signs.to(device, dtype), None if odd is None else odd.to(device, dtype),
                                [hs[b] for b in self.sizes])
        return self._cache[key]

    def _kron(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """Each row v of x (t, n) -> K v (or K^T v): every factor applied along its own axis."""
        _, odd, hs = self._tensors(x.device, x.dtype)
        t = x.shape[0]
        dims = [self.odd, *self.sizes]
        mats = [odd, *hs]  # Hadamard factors are symmetric
        y = x
        for i, (size, M) in enumerate(zip(dims, mats)):
            if M is None:
                continue
            before = math.prod(dims[:i])
            after = self.n // (before * size)
            y = y.reshape(t * before, size, after)
            # along axis `size`: y[b, j, a] = sum_i M[j, i] y[b, i, a]
            y = (M.T if transpose else M) @ y if after > 1 else y.squeeze(-1) @ (M if transpose else M.T)
        return y.reshape(t, self.n)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x V^T: each row v of x (..., n) -> V v = K (s * v)."""
        shape = x.shape
        signs, _, _ = self._tensors(x.device, x.dtype)
        return self._kron((x * signs).reshape(-1, self.n), False).reshape(shape)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        """x V: each row v of x (..., n) -> V^T v = s * (K^T v)."""
        shape = x.shape
        signs, _, _ = self._tensors(x.device, x.dtype)
        return (self._kron(x.reshape(-1, self.n), True) * signs).reshape(shape)

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """V as a dense n x n matrix (tests and small widths only)."""
        return self.apply(torch.eye(self.n, dtype=dtype)).T


def _side_seed(seed: int, side: int) -> int:
    """The generator seed of one side (0: inputs, V; 1: outputs, U) of a weight's transform."""
    return (2 * seed + side) % (1 << 64)


@dataclass(frozen=True)
class Incoherence:
    """The two-sided transform of an (m x n) weight from one seed: W' = U W V^T (U: outputs, V: inputs)."""

    shape: tuple[int, int]
    seed: int
    kind: str = "hadamard"
    out: RandomizedHadamard = field(init=False, repr=False, compare=False)
    inp: RandomizedHadamard = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind != "hadamard":
            raise ValueError(f"incoherence kind {self.kind!r} is unknown; use hadamard")
        check_seed(self.seed)
        m, n = self.shape
        object.__setattr__(self, "out", RandomizedHadamard(m, _side_seed(self.seed, 1)))
        object.__setattr__(self, "inp", RandomizedHadamard(n, _side_seed(self.seed, 0)))

    def rotate(self, W: torch.Tensor) -> torch.Tensor:
        """W' = U W V^T."""
        return self.out.apply(self.inp.apply(W).T).T.contiguous()

    def restore(self, W: torch.Tensor) -> torch.Tensor:
        """W = U^T W' V (the inverse of `rotate`)."""
        return self.out.apply_t(self.inp.apply_t(W).T).T.contiguous()

    def restore_left(self, L: torch.Tensor) -> torch.Tensor:
        """U^T L' for a left factor (m x r), so that U^T L' R' V = (U^T L')(R' V)."""
        return self.out.apply_t(L.T).T.contiguous()

    def restore_right(self, R: torch.Tensor) -> torch.Tensor:
        """R' V for a right factor (r x n)."""
        return self.inp.apply_t(R)

    def rotate_hessian(self, H: torch.Tensor) -> torch.Tensor:
        """H' = V H V^T, the inputs' second moment in the rotated basis (x' = V x), symmetric as H."""
        Hr = self.inp.apply(self.inp.apply(H).T)
        return (Hr + Hr.T) / 2

    def to_json(self) -> dict:
        return {"kind": self.kind, "seed": self.seed}
