"""GPTQ: reduction to RTN, the error-feedback identity, a column-at-a-time reference, dead inputs, singular H,
activation order with static groups, awkward shapes, storage."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lplr_convert.math import quantize as qz
from lplr_convert.math.gptq import gptq, gptq_detailed
from lplr_convert.math.weighted import weighted_error

M, N = 37, 53
SCHEMES = [("minmax", "float32", None), ("symmetric", "float32", None), ("symmetric", "float16", None),
           ("asymmetric", "float32", None), ("asymmetric", "float16", None), ("symmetric", "float32", "mse"),
           ("asymmetric", "float16", "mse")]
GRANULARITIES = [("tensor", 0, None), ("channel", 0, None), ("channel", 1, None), ("group", 0, 16), ("group", 0, 7),
                 ("group", 0, 64)]


def _spec(shape, bits, gran, dim, gs, scheme, scale_dtype="float32", clip=None) -> qz.QuantSpec:
    return qz.QuantSpec(tuple(shape), bits, gran, dim, gs, scheme=scheme, scale_dtype=scale_dtype, clip=clip)


def _weight(seed: int, dtype=torch.float32, m=M, n=N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 0.5, m).unsqueeze(1)).to(dtype)


def _hessian(n: int, seed: int, samples: int | None = None, strong: int = 3, dead=()) -> torch.Tensor:
    """H = X^T X / N (float64) for activations with a non-zero mean and a few strong shared directions (so inputs are
    strongly correlated); the `dead` inputs are always zero."""
    g = torch.Generator().manual_seed(seed)
    N_ = samples or 4 * n
    X = 0.3 * torch.randn(N_, n, generator=g, dtype=torch.float64) + 0.5
    X += 3 * torch.randn(N_, strong, generator=g, dtype=torch.float64) @ torch.randn(strong, n, generator=g,
                                                                                         dtype=torch.float64)
    X[:, list(dead)] = 0
    return X.T @ X / N_


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The H GPTQ works with: dead diagonal entries set to 1, then damp * mean(diag) added."""
    H = H.double().clone()
    d = H.diagonal()
    d[d == 0] = 1
    d += damp * d.mean()
    return H


def _decodes_to(q: qz.Quantized, w_hat: torch.Tensor) -> bool:
    """The stored fields (through a JSON spec) decode exactly to w_hat."""
    spec = qz.QuantSpec.from_json(q.spec.to_json())
    return torch.equal(qz.dequantize(qz.from_fields(qz.to_fields(q), spec), w_hat.dtype), w_hat)


@pytest.mark.parametrize("scheme,scale_dtype,clip", SCHEMES)
@pytest.mark.parametrize("gran,dim,gs", GRANULARITIES)
def test_identity_hessian_gives_the_rtn_codes(scheme, scale_dtype, clip, gran, dim, gs):
    """H = I (any damp) makes U = I / sqrt(1 + damp) diagonal: no error is fed forward, so GPTQ is RTN exactly. A
    diagonal H with distinct entries does the same with activation order, whose permutation must be undone."""
    W = _weight(0)
    spec = _spec(W.shape, 3, gran, dim, gs, scheme, scale_dtype, clip)
    rtn, rtn_hat = qz.quantize_dequantize_spec(W, spec)
    diag = torch.diag(torch.linspace(0.5, 2.0, N)[torch.randperm(N, generator=torch.Generator().manual_seed(1))])
    for H, damp, act_order in [(torch.eye(N), 0.0, False), (torch.eye(N), 0.3, False), (diag, 0.01, True)]:
        q, w_hat = gptq(W, H, spec, damp=damp, block_size=5, act_order=act_order)
        assert q.spec == rtn.spec and torch.equal(q.codes, rtn.codes) and torch.equal(q.scale, rtn.scale)
        assert torch.equal(w_hat, rtn_hat) and _decodes_to(q, w_hat)


@pytest.mark.parametrize("scheme,scale_dtype,clip", SCHEMES)
@pytest.mark.parametrize("gran,dim,gs", [("channel", 0, None), ("group", 0, 7)])
@pytest.mark.parametrize("act_order", [False, True])
def test_error_feedback_identity(scheme, scale_dtype, clip, gran, dim, gs, act_order):
    """W' - W_hat = E U with E the fed-back errors err_i = (w_i - q_i) / U_ii (column i of W - W_hat collects
    err_j U_ji for j <= i, U upper triangular). With H' = U^-1 U^-T (H'^-1 = U^T U):
    tr((W' - W_hat) H' (W' - W_hat)^T) = tr(E U H' U^T E^T) = ||E||_F^2 = sum of err_i^2.
    float64 throughout: both sides agree to round-off ~ cond(H') * eps (cond <= ~1e4 here after damping), so 1e-9."""
    W = _weight(2, torch.float64)
    H = _hessian(N, 3, dead=(4, 30))
    spec = _spec(W.shape, 3, gran, dim, gs, scheme, scale_dtype, clip)
    r = gptq_detailed(W, H, spec, damp=0.01, block_size=8, act_order=act_order)
    W_dead = W.clone()
    W_dead[:, [4, 30]] = 0
    assert float(r.feedback) == pytest.approx(float(weighted_error(W_dead, r.w_hat, _damped(H, 0.01))), rel=1e-9)
    assert _decodes_to(r.quantized, r.w_hat)


def _naive_gptq(W: torch.Tensor, H: torch.Tensor, spec: qz.QuantSpec, damp: float, act_order: bool):
    """Textbook GPTQ, one column at a time with immediate updates (no blocks), U from an explicit inverse; group
    parameters from the current weights at each group start, or all fitted up front with act_order. float64."""
    dead = H.diagonal() == 0
    W, H = W.double().clone(), _damped(H, damp)
    W[:, dead] = 0
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(W.shape[1])
    static = qz.fit_params(W, spec) if act_order or spec.granularity != "group" else None
    U = torch.linalg.cholesky(torch.linalg.inv(H[order][:, order]), upper=True)
    W = W[:, order]
    codes = torch.empty(W.shape, dtype=torch.uint8)
    for j, col in enumerate(order.tolist()):
        if static is None and col % spec.group_size == 0:
            params = qz.fit_params(W[:, j:j + spec.group_size], spec)
        elif static is not None:
            k = 0 if static.scale.shape[1] == 1 else (col // spec.group_size if spec.group_size else col)
            params = static.map(lambda t, k=k: t[:, k:k + 1])
        col_spec = dataclasses.replace(spec, shape=(W.shape[0], 1), granularity="channel", channel_dim=0,
                                       group_size=None)
        if params.scale.shape[0] == 1:
            col_spec = dataclasses.replace(col_spec, granularity="tensor")
        qc = qz.quantize_with(W[:, j:j + 1], params, col_spec)
        q = qz.dequantize(qc, torch.float64)[:, 0]
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)
        W[:, j] = q
        codes[:, col] = qc.codes[:, 0]
    inv = torch.argsort(order)
    return codes, W[:, inv]


@pytest.mark.parametrize("scheme,scale_dtype", [("symmetric", "float32"), ("asymmetric", "float16")])
@pytest.mark.parametrize("gran,dim,gs", [("tensor", 0, None), ("channel", 1, None), ("group", 0, 16),
                                         ("group", 0, 7)])
@pytest.mark.parametrize("act_order", [False, True])
def test_blocked_gptq_equals_the_column_at_a_time_reference(scheme, scale_dtype, gran, dim, gs, act_order):
    """Lazy block updates, cuts at group starts, the flipped-Cholesky U and the static groups of act_order change
    round-off only (float64, ~1e-14): codes agree exactly unless a value lands within ~1e-14 of a rounding boundary
    (probability ~1e-10 over these 2000 codes), values to 1e-10 of their scale."""
    W = _weight(4, torch.float64)
    H = _hessian(N, 5, dead=(11,))
    spec = _spec(W.shape, 4, gran, dim, gs, scheme, scale_dtype)
    ref_codes, ref_hat = _naive_gptq(W, H, spec, 0.01, act_order)
    for block_size in (1, 6, 128):
        q, w_hat = gptq(W, H, spec, block_size=block_size, act_order=act_order)
        assert torch.equal(q.codes, ref_codes)
        assert torch.allclose(w_hat, ref_hat, rtol=0, atol=1e-10)
        if act_order or gran != "group":
            assert torch.equal(q.scale, qz.fit_params(torch.where(torch.arange(N) == 11, 0.0, W), spec).scale)


def test_dead_inputs_are_zeroed_and_ignored():
    """A dead input (H_ii = 0) gets a zero column whatever W holds there; 0 is exact in symmetric/asymmetric."""
    W = _weight(6)
    H = _hessian(N, 7, dead=(0, 17, 52))
    for scheme in ("symmetric", "asymmetric"):
        spec = _spec(W.shape, 4, "group", 0, 16, scheme)
        q, w_hat = gptq(W, H, spec)
        W2 = W.clone()
        W2[:, [0, 17, 52]] = torch.randn(M, 3, generator=torch.Generator().manual_seed(8)) * 100
        q2, w_hat2 = gptq(W2, H, spec)
        assert torch.equal(w_hat, w_hat2) and torch.equal(q.codes, q2.codes)
        assert torch.equal(w_hat[:, [0, 17, 52]], torch.zeros(M, 3)) and torch.isfinite(w_hat).all()


def test_singular_hessian_needs_damping_and_then_beats_rtn():
    """H from 20 samples of 53 inputs has rank <= 20: damping makes it definite; without damping it is refused."""
    W = _weight(9)
    H = _hessian(N, 10, samples=20)
    spec = _spec(W.shape, 3, "group", 0, 16, "symmetric")
    q, w_hat = gptq(W, H, spec)
    assert torch.isfinite(w_hat).all() and _decodes_to(q, w_hat)
    rtn = qz.dequantize(qz.quantize_spec(W, spec))
    assert float(weighted_error(W, w_hat, H)) < float(weighted_error(W, rtn, H))
    with pytest.raises(ValueError, match="damp"):
        gptq(W, H, spec, damp=0.0)


@pytest.mark.parametrize("scheme", ["minmax", "symmetric", "asymmetric"])
@pytest.mark.parametrize("gran,dim,gs,bits,act_order", [("group", 0, 16, 4, False), ("group", 0, 16, 3, True),
                                                        ("channel", 0, None, 3, False), ("channel", 1, None, 4, True),
                                                        ("tensor", 0, None, 8, False)])
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(scheme, gran, dim, gs, bits, act_order):
    """Regression check, not a theorem (GPTQ is greedy): on these seeded, strongly correlated inputs GPTQ's output
    error tr(D H D^T) is below round-to-nearest's for every scheme; a failure here means GPTQ broke."""
    W = _weight(11, m=64, n=96)
    H = _hessian(96, 12)
    spec = _spec(W.shape, bits, gran, dim, gs, scheme)
    _, w_hat = gptq(W, H, spec, act_order=act_order, block_size=32)
    rtn = qz.dequantize(qz.quantize_spec(W, spec))
    assert float(weighted_error(W, w_hat, H)) < float(weighted_error(W, rtn, H))


def test_float_widths_are_casts():
    W = _weight(13)
    for bits in (16, 32):
        q, w_hat = gptq(W, _hessian(N, 14), qz.QuantSpec(tuple(W.shape), bits))
        assert torch.equal(w_hat, W.to(torch.float16).float() if bits == 16 else W) and _decodes_to(q, w_hat)


def test_float16_scales_fall_back_to_float32():
    W = _weight(15)
    W[5] *= 1e8  # row scales beyond float16's range
    for gran, gs in (("group", 16), ("channel", None)):
        q, w_hat = gptq(W, _hessian(N, 16), _spec(W.shape, 4, gran, 0, gs, "asymmetric", "float16"))
        assert q.spec.scale_dtype == "float32" and q.scale.dtype == torch.float32
        assert torch.isfinite(w_hat).all() and _decodes_to(q, w_hat)


def test_bad_arguments_are_refused():
    W, H = _weight(17), torch.eye(N)
    spec = _spec(W.shape, 4, "channel", 0, None, "symmetric")
    with pytest.raises(ValueError, match="2-D"):
        gptq(W[0], H, spec)
    with pytest.raises(ValueError, match="H has shape"):
        gptq(W, torch.eye(N + 1), spec)
    with pytest.raises(ValueError, match="spec is for"):
        gptq(W[:, :50], torch.eye(50), spec)
    with pytest.raises(ValueError, match="block_size"):
        gptq(W, H, spec, block_size=0)


def test_a_precomputed_factor_gives_the_same_bits_and_must_match_the_settings():
    from lplr_convert.math.gptq import gptq_factor

    W, H = _weight(3), _hessian(N, 4, dead=(5,))
    spec = _spec(W.shape, 3, "group", 0, 16, "asymmetric", "float16", "mse")
    for act_order in (False, True):
        f = gptq_factor(H, damp=0.01, act_order=act_order)
        a = gptq_detailed(W, H, spec, act_order=act_order)
        b = gptq_detailed(W, H, spec, act_order=act_order, factor=f)
        assert torch.equal(a.w_hat, b.w_hat) and torch.equal(a.quantized.codes, b.quantized.codes)
        assert torch.equal(a.quantized.scale, b.quantized.scale)
        with pytest.raises(ValueError, match="other settings"):
            gptq(W, H, spec, act_order=not act_order, factor=f)
    with pytest.raises(ValueError, match="other settings"):
        gptq(W.double(), H, spec, factor=gptq_factor(H))  # float64 weights work in float64


@pytest.mark.parametrize("scheme,scale_dtype,clip", [s for s in SCHEMES if s[0] != "minmax"])
@pytest.mark.parametrize("gran,dim,gs", GRANULARITIES)
def test_a_kept_grid_is_the_grid_used(scheme, scale_dtype, clip, gran, dim, gs):
    """`params=` keeps a grid instead of fitting one: with activation order (static groups, fitted on W itself)
    keeping the grid GPTQ fits gives the same result bit for bit; without it (groups fitted as the sweep reaches
    them) the stored parameters are the kept ones exactly, decode to w_hat, and the error identity holds."""
    W, H = _weight(5, torch.float64), _hessian(N, 6)  # float64: the identity below to round-off (as above)
    spec = _spec(W.shape, 3, gran, dim, gs, scheme, scale_dtype, clip)
    a = gptq_detailed(W, H, spec, act_order=True)
    b = gptq_detailed(W, H, a.quantized.spec, act_order=True, params=a.quantized.params)
    assert torch.equal(a.w_hat, b.w_hat) and torch.equal(a.quantized.codes, b.quantized.codes)
    W2 = W + 0.05 * _weight(7, torch.float64)  # another matrix of the shape (a qlr backbone update W - L R)
    c = gptq_detailed(W2, H, a.quantized.spec, params=a.quantized.params)
    for f in ("scale", "zero_point"):
        kept, got = getattr(a.quantized, f), getattr(c.quantized, f)
        assert (kept is None and got is None) or torch.equal(kept, got)
    assert _decodes_to(c.quantized, c.w_hat)
    assert float(c.feedback) == pytest.approx(float(weighted_error(W2, c.w_hat, _damped(H, 0.01))), rel=1e-9)
