"""The report's spectra: the default (estimate) curves reuse the singular values the method computed and agree with
the exact spectrum within the stated bounds; exact curves match float64; a conversion stores them in the records and
the report says which kind each curve is (or why there is none) without reading the source again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lplr_testing import run_cli
from safetensors.torch import load_file

from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest
from lplr_convert.methods import get_method, make_settings
from lplr_convert.report.spectra import _sampled_ranks, energy_curve, tensor_spectrum

# Float32 round-off of the method's singular values: each sigma_i^2 is a float32 inner product of length n <= 1536
# (a Gram entry, or a column norm of A V), off by at most gamma_n = n * 2^-24 = 9.2e-5 relative to the energies it
# sums; the normalized cumulative energy inherits at most that. Ranks beyond the method's k are only bracketed.
FLOAT32_ENERGY = 1536 * 2.0**-24
METHODS = [("lsvd", {"rank_fraction": 0.5}), ("laser", {"rho": 0.3}), ("dsvd", {"rank_fraction": 0.25})]
MATRICES = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.2.intermediate.dense.weight",
            "encoder.layer.5.output.dense.weight"]  # 384x384, 1536x384, 384x1536


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    sd = load_file(str(Path(minilm_dir) / "model.safetensors"))
    return {name: sd[next(k for k in sd if k.endswith(name))].float() for name in MATRICES}


def _exact(W: torch.Tensor) -> torch.Tensor:
    return torch.tensor(energy_curve(torch.linalg.svdvals(W.double())), dtype=torch.float64)


@pytest.mark.parametrize("method,knobs", METHODS)
def test_default_estimate_is_exact_to_the_kept_rank_and_brackets_the_rest(minilm, method, knobs):
    for name, W in minilm.items():
        result = get_method(method).compress(W, make_settings(method, **knobs), seed=0)
        sp = tensor_spectrum("estimate", W, result.spectrum)
        assert sp["kind"] == "svd" and sp["exact_to"] == pytest.approx(result.rank / min(W.shape), abs=1e-6)
        exact = _exact(W)
        lower, upper = torch.tensor(sp["curve"]), torch.tensor(sp["upper"])
        kept = torch.tensor(_sampled_ranks(min(W.shape), len(exact))) <= result.rank
        assert (lower[kept] - exact[kept]).abs().max() <= FLOAT32_ENERGY, name
        assert torch.equal(lower[kept], upper[kept])
        beyond = ~kept
        assert bool((lower[beyond] <= exact[beyond] + FLOAT32_ENERGY).all()), name  # the chord: a lower bound
        assert bool((exact[beyond] <= upper[beyond] + FLOAT32_ENERGY).all()), name  # the sigma_k slope: an upper one
        assert float((exact[beyond] - lower[beyond]).max()) > 1e-3  # a real bracket, not the exact curve


def test_exact_curves_match_float64(minilm):
    # singular_values(precise=False) puts each eigenvalue within ~1e-7 sigma_max^2, which moves the energy fraction by
    # well under 1e-4 (math.svd docstring; tests/math/test_svd.py checks the same bound).
    for W in minilm.values():
        sp = tensor_spectrum("exact", W, None)
        assert sp["kind"] == "exact" and sp["upper"] is None
        assert (torch.tensor(sp["curve"]) - _exact(W)).abs().max() < 1e-4


def test_estimate_without_method_singular_values_and_off_give_nothing(minilm):
    W = minilm[MATRICES[0]]
    lplr = get_method("lplr").compress(W, make_settings("lplr"), seed=0)
    assert lplr.spectrum is None and tensor_spectrum("estimate", W, lplr.spectrum) is None
    assert tensor_spectrum("off", W, torch.ones(3)) is None


def _report(out: Path) -> dict:
    return json.loads((out / C.REPORT_JSON).read_text())


def test_a_conversion_stores_the_curves_and_the_report_names_their_kind(tiny_llama_dir, tmp_path):
    base = ["--in-path", str(tiny_llama_dir), "--method", "lsvd", "--rank-fraction", "0.5"]
    runs = {mode: tmp_path / mode for mode in ("estimate", "exact", "off")}
    for mode, out in runs.items():
        res = run_cli(*base, "--out-path", str(out), "--spectra", mode)
        assert res.exit_code == 0, res.output
    est, exact = _report(runs["estimate"]), _report(runs["exact"])
    assert len(est["spectra"]) == 4 and list(est["spectra"]) == list(exact["spectra"])
    assert {v["kind"] for v in est["spectra_info"].values()} == {"svd"}
    assert {v["kind"] for v in exact["spectra_info"].values()} == {"exact"}
    assert "from the method's own SVD" in (runs["estimate"] / C.REPORT_MD).read_text()
    records = {r["name"]: r for r in read_manifest(runs["estimate"])[C.M_TENSORS]}
    assert {n for n, r in records.items() if r["spectrum"]} == set(est["spectra"])
    for name in est["spectra"]:  # the estimate brackets the exact curve of the same tensor
        lo, hi, ex = (torch.tensor(c) for c in (est["spectra"][name], est["spectra_info"][name]["upper"],
                                                 exact["spectra"][name]))
        assert bool((lo <= ex + 1e-4).all() & (ex <= hi + 1e-4).all())
    off = _report(runs["off"])
    assert off["spectra"] == {} and not (runs["off"] / C.PLOT_SPECTRUM).exists()
    assert "not computed (--spectra off)" in off["spectra_note"]


def test_lplr_by_default_has_no_curve_and_the_report_says_why(tiny_llama_dir, tmp_path, monkeypatch):
    from lplr_convert import report

    monkeypatch.setattr(report, "source_spectra", lambda *a, **k: pytest.fail("the source was read again"))
    out = tmp_path / "lplr"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out))
    assert res.exit_code == 0, res.output
    doc = _report(out)
    assert doc["spectra"] == {} and "lplr computes no singular values" in doc["spectra_note"]
    assert "--spectra exact" in (out / C.REPORT_MD).read_text()
