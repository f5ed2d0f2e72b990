"""Our methods against a faithful re-implementation of the published code (scripts/reference_lplr.py).

On real all-MiniLM-L6-v2 weights, with the same sketch and the published per-tensor quantizer, our LPLR / LSVD / DSVD /
RTN errors match the reference within 1 %; with our default per-channel quantizer they are never worse.
LSVD and DSVD depend on the arbitrary signs of singular vectors under a per-tensor quantizer, so the 1 % comparison
uses the reference with our sign convention, and "never worse" is checked against both conventions. They are compared
at 8 bits only: at 4 bits the per-tensor quantizer makes them erratic (the reference reaches errors > 1 there, e.g. 12.9
for LSVD on encoder.layer.5.output.dense at f = 0.8), so there is no stable number to match.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lplr_convert.math.error import relative_error
from lplr_convert.math.sketch import derive_seed, sketch_matrix
from lplr_convert.methods import RankPolicy, get_method, make_settings

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
         "encoder.layer.5.output.dense.weight"]
# (method, bits, rank fraction); rtn uses bits as b0 and no rank.
CASES = [("lplr", 8, 0.8), ("lplr", 4, 0.3), ("lsvd", 8, 0.8), ("dsvd", 8, 0.8), ("rtn", 8, None), ("rtn", 4, None)]


def _load_reference():
    spec = importlib.util.spec_from_file_location("reference_lplr", ROOT / "scripts" / "reference_lplr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


def _reference_error(W: torch.Tensor, method: str, bits: int, r: int | None, seed: int, svd,
                     canonical_signs: bool = True) -> float:
    if method == "lplr":
        approx = ref.lplr(W, r, bits, bits, sketch_matrix(W.shape[1], r, seed))
    elif method == "lsvd":
        approx = ref.lsvd(W, r, bits, bits, canonical_signs=canonical_signs, svd=svd)
    elif method == "dsvd":
        approx = ref.dsvd(W, r, bits, bits, canonical_signs=canonical_signs, svd=svd)
    else:
        approx = ref.naive(W, bits)
    return ref.rel_error(W, approx)


def _ours(W: torch.Tensor, method: str, bits: int, fraction: float | None, quantizer: str, seed: int):
    if method == "rtn":
        s = make_settings(method="rtn", b0=bits, quantizer=quantizer, scheme="minmax")  # the published grid
    else:
        s = make_settings(method=method, b1=bits, b2=bits, quantizer=quantizer, scheme="minmax",
                           rank=RankPolicy("rank_fraction", fraction))
    return get_method(method).compress(W, s, seed)


@pytest.fixture(scope="module")
def table(minilm_dir) -> list[dict]:
    """Every (tensor, case): the reference error and ours with the tensor and the channel quantizer."""
    rows = []
    with safe_open(str(minilm_dir / "model.safetensors"), "pt") as fh:
        for name in NAMES:
            W = fh.get_tensor(name).float()
            seed = derive_seed(0, name)
            svd = torch.linalg.svd(W, full_matrices=False)  # one LAPACK SVD shared by the reference calls
            for method, bits, fraction in CASES:
                r = None if fraction is None else math.ceil(fraction * min(W.shape))
                row = {"name": name, "method": method, "bits": bits, "fraction": fraction,
                       "reference": _reference_error(W, method, bits, r, seed, svd)}
                row["reference_lapack_signs"] = (_reference_error(W, method, bits, r, seed, svd, False)
                                                 if method in ("lsvd", "dsvd") else row["reference"])
                for quantizer in ("tensor", "channel"):
                    res = _ours(W, method, bits, fraction, quantizer, seed)
                    assert res.rank == r
                    row[quantizer] = res.error()
                rows.append(row)
    return rows


def _label(row: dict) -> str:
    return f"{row['name']} {row['method']} b={row['bits']} f={row['fraction']}"


def test_tensor_quantizer_matches_the_published_algorithms_within_1_percent(table):
    for row in table:
        assert row["tensor"] == pytest.approx(row["reference"], rel=0.01), _label(row)


def test_default_channel_quantizer_is_never_worse_than_the_reference(table):
    for row in table:
        assert row["channel"] <= min(row["reference"], row["reference_lapack_signs"]) * (1 + 1e-6), _label(row)
    # And it is not just equal: at 4 bits per-channel scales are clearly better.
    four_bit = [row for row in table if row["bits"] == 4]
    assert all(row["channel"] < 0.97 * row["reference"] for row in four_bit)


def test_reference_quantizer_is_the_published_one():
    """2**B levels spanning [min, max], nearest level with ties going up; 16 = fp16 cast, 32 = float32 cast."""
    assert ref.quantize(torch.tensor([[-1.0, 0.0, 1.0]]), 1).tolist() == [[-1.0, 1.0, 1.0]]  # an exact tie goes up
    q2 = ref.quantize(torch.tensor([[-1.0, -0.5, 0.1, 0.7, 1.0]]), 2)  # levels -1, -1/3, 1/3, 1
    assert torch.allclose(q2, torch.tensor([[-1.0, -1 / 3, 1 / 3, 1.0, 1.0]], dtype=torch.float64))
    y = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref.quantize(y, 16), y.half().double())
    assert torch.equal(ref.quantize(y, 32), y.double())
    q = ref.quantize(y, 3)
    assert len(torch.unique(q)) <= 8 and float(q.min()) == float(y.min())
    assert float(q.max()) == pytest.approx(float(y.max()), rel=1e-12)


def test_reference_and_ours_agree_with_the_same_sketch_only():
    """'Same seed' means the same sketch: a different sketch gives a different (if similar) reference error. The
    published arithmetic is a float32 sketch product (the default takes bfloat16 where the CPU has it: its errors
    move by less than between sketches, `math.sketch.sketch_product`)."""
    W = torch.randn(120, 80, generator=torch.Generator().manual_seed(1))
    s = make_settings(method="lplr", b1=4, b2=4, quantizer="tensor", scheme="minmax", rank=RankPolicy("rank", 30),
                       sketch_precision="float32")
    ours = get_method("lplr").compress(W, s, 5).error()
    same = ref.rel_error(W, ref.lplr(W, 30, 4, 4, sketch_matrix(80, 30, 5)))
    other = ref.rel_error(W, ref.lplr(W, 30, 4, 4, sketch_matrix(80, 30, 6)))
    assert ours == pytest.approx(same, rel=1e-3)
    assert abs(other - same) > 1e-4


def test_reference_full_rank_float32_is_exact_up_to_pinv():
    W = torch.randn(60, 40, generator=torch.Generator().manual_seed(2))
    approx = ref.lplr(W, 40, 32, 32, sketch_matrix(40, 40, 0))
    assert float(relative_error(W, approx.float())) < 1e-4
