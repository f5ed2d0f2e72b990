"""Every method that stores quantized matrices declares them (`Method.layout`), and the declaration decodes to exactly
what the method's own `decode` returns; dense methods declare none."""

import pytest
import torch

from lplr_convert.methods import get_method, make_settings
from lplr_convert.methods.base import PackedLayout

CASES = [
    ("rtn", {"b0": 4, "quantizer": "group", "group_size": 16}),
    ("gptq", {"b0": 3}),
    ("lplr", {"b1": 8, "b2": 4, "rank_fraction": 0.5}),
    ("lsvd", {"b1": 4, "b2": 4, "rank": 5}),
    ("dsvd", {"b1": 16, "b2": 8, "rank": 3}),
    ("qlr", {"b0": 2, "rank": 4}),
    ("qlr", {"b0": 3, "rank": 0}),
]


@pytest.mark.parametrize("method,knobs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_layout_decodes_to_what_the_method_decodes(method, knobs):
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    m = get_method(method)
    res = m.compress(W, make_settings(method, **knobs), seed=3)
    lay = m.layout(res.info)
    assert isinstance(lay, PackedLayout) and lay.shape == (24, 40)
    W_hat = torch.zeros(24, 40)
    if lay.backbone is not None:
        W_hat += lay.backbone.dequantized(res.parts)
    if lay.low_rank:
        assert lay.rank == lay.left.spec.shape[1] == lay.right.spec.shape[0]
        W_hat += lay.left.dequantized(res.parts) @ lay.right.dequantized(res.parts)
    assert torch.allclose(W_hat, m.decode(res.parts, res.info), atol=1e-6)
    assert (lay.backbone is not None) == (method in ("rtn", "gptq", "qlr"))
    assert lay.low_rank == (method in ("lplr", "lsvd", "dsvd") or (method == "qlr" and knobs["rank"] > 0))


@pytest.mark.parametrize("method", ["laser", "copy"])
def test_dense_methods_declare_no_layout(method):
    W = torch.randn(12, 10)
    m = get_method(method)
    knobs = {"rank_fraction": 0.5} if method == "laser" else {}
    res = m.compress(W, make_settings(method, **knobs), seed=0)
    assert m.layout(res.info) is None


def test_a_layout_needs_both_factors_and_something_stored():
    with pytest.raises(ValueError):
        PackedLayout()
