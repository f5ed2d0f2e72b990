"""Output error tr(D H D^T): blocked float64 kernel against the plain formula, H = I is Frobenius, round-off clamps."""

from __future__ import annotations

import pytest
import torch
from calib_testing import random_hessian, weighted_sq

from lplr_convert.math import weighted
from lplr_convert.math.error import relative_error
from lplr_convert.math.weighted import weighted_error, weighted_relative_error


def test_blocked_kernel_matches_the_formula(monkeypatch):
    monkeypatch.setattr(weighted, "_block_rows", lambda n: 3)  # several row blocks, a ragged last one
    g = torch.Generator().manual_seed(31)
    W, W_hat = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    H = random_hessian(8, seed=32)
    ref = weighted_sq(W.double() - W_hat.double(), H)  # the difference taken in float64, as the kernel does
    # float64 sums of the same float32 inputs in another order: ~1e-15 relative.
    assert float(weighted_error(W, W_hat, H)) == pytest.approx(ref, rel=1e-12)
    den = weighted_sq(W, H)
    assert float(weighted_relative_error(W, W_hat, H)) == pytest.approx((ref / den) ** 0.5, rel=1e-12)
    assert weighted_error(W, W_hat, H).dtype == torch.float64


def test_float32_inputs_are_weighted_in_float64():
    """D along H's smallest eigenvector (lambda 1) next to lambda_max = 1e8: a float32 product D H would carry
    round-off ~eps32 * 1e8 = 10 against the true value ~1."""
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(33), dtype=torch.float64))
    H = (Q * torch.tensor([1.0, 1e2, 1e4, 1e6, 1e7, 1e8], dtype=torch.float64)) @ Q.T
    D = Q[:, :1].T.float()  # 1 x 6, float32
    ref = weighted_sq(D, H)
    assert ref == pytest.approx(1.0, rel=1e-4)  # float32 rounding of the eigenvector leaks ~(1e-8)^2 * 1e8
    assert float(weighted_error(D, torch.zeros_like(D), H)) == pytest.approx(ref, rel=1e-12)


def test_identity_hessian_is_the_frobenius_error(decaying):
    W_hat = decaying + 0.01 * torch.randn(decaying.shape, generator=torch.Generator().manual_seed(34))
    eye = torch.eye(decaying.shape[1])
    assert float(weighted_relative_error(decaying, W_hat, eye)) == pytest.approx(
        float(relative_error(decaying, W_hat)), rel=1e-12)


def test_round_off_negative_numerator_clamps_and_zero_hessian_is_zero():
    H = torch.diag(torch.tensor([-1e-12, 1.0], dtype=torch.float64))  # indefinite by round-off
    W = torch.tensor([[0.0, 1.0]])
    assert float(weighted_relative_error(W, W + torch.tensor([[1.0, 0.0]]), H)) == 0.0
    assert float(weighted_relative_error(W, 2 * W, torch.zeros(2, 2))) == 0.0
