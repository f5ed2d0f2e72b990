"""The randomized Hadamard transform of incoherence processing (`math.hadamard`): orthogonal for every width, exactly
the Sylvester Hadamard times random signs for a power of two (and that Kronecker the odd factor otherwise), the same
transform from the same seed, and the weight / Hessian identities the methods rely on."""

from __future__ import annotations

import pytest
import torch

from lplr_convert.math.hadamard import Incoherence, RandomizedHadamard, check_seed, sylvester

WIDTHS = (1, 2, 3, 64, 96, 160, 256, 576, 1536)


def _dense_sylvester(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j) / sqrt(n), built entry by entry (independently of `sylvester`)."""
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).double() / n ** 0.5


@pytest.mark.parametrize("n", WIDTHS)
def test_transform_is_orthogonal(n):
    V = RandomizedHadamard(n, 7).dense()
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(V @ V.T, eye, atol=1e-12) and torch.allclose(V.T @ V, eye, atol=1e-12)


@pytest.mark.parametrize("n", [2, 64, 128, 256, 1024, 4096])
def test_power_of_two_widths_are_the_sylvester_hadamard_with_random_signs(n):
    T = RandomizedHadamard(n, 11)
    signs, odd = T._draw()
    assert odd is None and set(signs.tolist()) <= {-1.0, 1.0}
    H = _dense_sylvester(n)
    assert torch.equal(sylvester(n), H) if n <= 64 else torch.allclose(sylvester(n), H, atol=1e-15)
    assert torch.allclose(T.dense(), H * signs, atol=1e-13)  # V = H diag(s)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(T.apply(x), x @ (H * signs).T, atol=1e-12)


@pytest.mark.parametrize("n", [3, 96, 576, 1536])
def test_other_widths_are_an_odd_orthogonal_factor_kronecker_the_hadamard(n):
    T = RandomizedHadamard(n, 5)
    signs, odd = T._draw()
    d = n // (n & -n)
    assert odd.shape == (d, d) and torch.allclose(odd @ odd.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    ref = torch.kron(odd, _dense_sylvester(n // d)) * signs
    assert torch.allclose(T.dense(), ref, atol=1e-12)


def test_same_seed_same_transform_other_seed_another():
    a, b, c = (RandomizedHadamard(576, s).dense() for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_apply_t_inverts_apply_on_any_batch_shape_and_dtype():
    T = RandomizedHadamard(96, 9)
    x = torch.randn(2, 5, 96)
    assert torch.allclose(T.apply_t(T.apply(x)), x, atol=1e-5)
    xb = x.to(torch.bfloat16)
    assert T.apply(xb).dtype == torch.bfloat16


def test_incoherence_identities():
    inc = Incoherence((96, 160), 123)
    U, V = inc.out.dense(), inc.inp.dense()
    W = torch.randn(96, 160, dtype=torch.float64)
    Wr = inc.rotate(W)
    assert torch.allclose(Wr, U @ W @ V.T, atol=1e-12)
    assert torch.allclose(inc.restore(Wr), W, atol=1e-12)
    L, R = torch.randn(96, 4, dtype=torch.float64), torch.randn(4, 160, dtype=torch.float64)
    assert torch.allclose(inc.restore_left(L) @ inc.restore_right(R), U.T @ L @ R @ V, atol=1e-12)
    X = torch.randn(160, 300, dtype=torch.float64)
    H = X @ X.T
    Hr = inc.rotate_hessian(H)
    assert torch.allclose(Hr, V @ H @ V.T, atol=1e-9) and torch.equal(Hr, Hr.T)
    # the output error is the same in both bases: tr(D H D^T) = tr(D' H' D'^T)
    D = torch.randn(96, 160, dtype=torch.float64)
    Dr = inc.rotate(D)
    assert torch.allclose(torch.trace(D @ H @ D.T), torch.trace(Dr @ Hr @ Dr.T), rtol=1e-10)
    assert inc.to_json() == {"kind": "hadamard", "seed": 123}


@pytest.mark.parametrize("seed", [-1, 1 << 63, 1.5, "7", True, None])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="incoherence seed"):
        Incoherence((4, 4), seed)
    with pytest.raises(ValueError, match="incoherence seed"):
        check_seed(seed)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind 'rotation' is unknown; use hadamard"):
        Incoherence((4, 4), 1, "rotation")
