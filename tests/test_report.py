"""The layer-wise report: tables agree with the manifest, bad numbers are flagged, plots and spectra are real."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import sys

import pytest
import torch
from lplr_testing import run_cli
from safetensors import safe_open

from lplr_convert import constants as C
from lplr_convert.pipeline.convert import ConvertOptions, convert
from lplr_convert.errors import LplrError
from lplr_convert.io.manifest import read_manifest
from lplr_convert.methods import RankPolicy
from lplr_convert.report import compare, energy_curve, summary_markdown, summary_table, write_report
from lplr_convert.report.metrics import tensor_rows
from lplr_convert.report.spectra import representative_tensors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_llama_dir):
    """The bf16 tiny Llama converted three ways (report writing off, so the tests call write_report themselves)."""
    runs = {
        "lplr": {"method": "lplr", "rank": RankPolicy("rank_fraction", 0.8)},
        "rtn": {"method": "rtn", "b0": 8},
        "grown": {"method": "lplr", "b1": 16, "b2": 16, "rank": RankPolicy("rank_fraction", 1.0)},
    }
    base = tmp_path_factory.mktemp("report")
    out = {}
    for name, layer in runs.items():
        d = base / name
        convert(ConvertOptions(in_path=str(tiny_llama_dir), out_path=str(d), layer=layer, write_report=False,
                               command=f"lplr-convert convert --method {name}"))
        out[name] = d
    return out


def test_report_files_match_the_manifest(outputs):
    out = outputs["lplr"]
    manifest = read_manifest(out)
    paths = write_report(out)
    names = {p.name for p in paths}
    assert {C.REPORT_JSON, C.REPORT_CSV, C.REPORT_MD, C.PLOT_ERROR, C.PLOT_BITS, C.PLOT_SPECTRUM} == names
    recs = manifest[C.M_TENSORS]
    doc = json.loads((out / C.REPORT_JSON).read_text())
    assert [r["name"] for r in doc["tensors"]] == [r["name"] for r in recs]  # copied tensors included
    for row, rec in zip(doc["tensors"], recs):
        assert row["method"] == rec["method"] and row["rank"] == rec["rank"] and row["shape"] == rec["shape"]
        assert row["rel_error"] == pytest.approx(rec["rel_error"], abs=0)
        assert row["bits_per_param"] == pytest.approx(8 * rec["stored_bytes"] / _numel(rec["shape"]))
        assert row["size_ratio"] == pytest.approx(rec["stored_bytes"] / rec["original_bytes"])
        assert row["source_bits_per_param"] == 16.0  # the checkpoint is bf16
    comp = [r for r in recs if r["method"] != "copy"]
    s = doc["summary"]
    assert s["original_bytes"] == sum(r["original_bytes"] for r in recs)
    assert s["stored_bytes"] == sum(r["stored_bytes"] for r in recs)
    assert s["n_compressed"] == len(comp) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    werr = sum(_numel(r["shape"]) * r["rel_error"] for r in comp) / sum(_numel(r["shape"]) for r in comp)
    assert s["weighted_rel_error"] == pytest.approx(werr, rel=1e-12)
    assert s["by_matrix_type"].keys() == {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_up", "fc_out"}
    assert s["grown"] == [] and "lplr" not in s["methods_above_source"]

    with open(out / C.REPORT_CSV, newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["name"] for t in table] == [r["name"] for r in recs]
    assert float(table[3]["rel_error"]) == pytest.approx(recs[3]["rel_error"], rel=1e-5)

    md = (out / C.REPORT_MD).read_text()
    tensor_lines = [line for line in md.splitlines() if line.startswith("| ") and "` | " in line]
    assert sorted(line.split("`")[1] for line in tensor_lines) == sorted(r["name"] for r in comp)
    assert "lplr-convert convert --method lplr" in md and f"{len(recs) - len(comp)} tensors" in md
    for p in (C.PLOT_ERROR, C.PLOT_BITS, C.PLOT_SPECTRUM):
        assert f"]({p})" in md
        data = (out / p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000  # a drawn figure, not an empty canvas


def test_tensors_larger_than_the_source_are_flagged(outputs):
    out = outputs["grown"]
    write_report(out)
    manifest = read_manifest(out)
    grown = [r["name"] for r in manifest[C.M_TENSORS] if r["stored_bytes"] > r["original_bytes"]]
    assert grown  # 16-bit factors at full rank are larger than the bf16 weights
    doc = json.loads((out / C.REPORT_JSON).read_text())
    assert doc["summary"]["grown"] == grown
    assert doc["summary"]["methods_above_source"] == ["lplr"]
    assert all("grew" in r["flags"] for r in doc["tensors"] if r["name"] in grown)
    md = (out / C.REPORT_MD).read_text()
    assert "LARGER than in the source" in md and "**GREW**" in md
    assert "more than the source's 16.00" in md
    text = summary_table(manifest)
    assert f"WARNING: {len(grown)} tensor(s) are stored LARGER" in text
    assert "LARGER" in summary_markdown(manifest)
    clean = summary_table(read_manifest(outputs["rtn"]))
    assert "WARNING" not in clean


def test_above_int8_flag_follows_the_int8_size(outputs):
    rows = tensor_rows(read_manifest(outputs["lplr"]))
    for r in rows:
        if r["method"] == "copy":
            assert r["flags"] == [] and r["int8_bits_per_param"] is None
            continue
        n = r["shape"][1]
        int8 = 8 + 2 * 32 / n  # 8-bit codes plus a float32 scale and zero per output row
        assert r["int8_bits_per_param"] == pytest.approx(int8)
        assert ("above_int8" in r["flags"]) == (r["bits_per_param"] > int8)
    flagged = {r["matrix_type"] for r in rows if "above_int8" in r["flags"]}
    assert "q_proj" in flagged  # 0.8 rank of a square matrix at 8/8 bits is ~13 bits/param
    assert all("above_int8" not in r["flags"] for r in tensor_rows(read_manifest(outputs["rtn"])))


def test_spectra_from_the_source_then_reused(outputs, tiny_llama_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(outputs["lplr"], out)
    write_report(out)
    doc = json.loads((out / C.REPORT_JSON).read_text())
    curves = doc["spectra"]
    rows = tensor_rows(read_manifest(out))
    assert list(curves) == representative_tensors(rows) and len(curves) == 4
    assert len({r["matrix_type"] for r in rows if r["name"] in curves}) == 4  # spread over types
    name = next(iter(curves))
    shard = json.loads((tiny_llama_dir / C.SAFE_INDEX).read_text())["weight_map"][name]
    with safe_open(str(tiny_llama_dir / shard), "pt") as f:
        W = f.get_tensor(name).double()
    s2 = torch.linalg.svdvals(W).square()
    expected = (torch.cumsum(s2, 0) / s2.sum()).tolist()
    assert curves[name] == pytest.approx(expected, abs=2e-6)

    # The source is gone: a re-render keeps the stored curves and the plot.
    manifest = read_manifest(out)
    manifest[C.M_SOURCE]["path"] = str(tmp_path / "moved-away")
    (out / C.PLOT_SPECTRUM).unlink()
    write_report(out, manifest)
    assert json.loads((out / C.REPORT_JSON).read_text())["spectra"] == curves
    assert (out / C.PLOT_SPECTRUM).read_bytes()[:8] == PNG_MAGIC

    # Curves passed by the caller win; with none anywhere the plot is skipped and an old one removed.
    given = {rows[-2]["name"]: energy_curve(torch.linspace(3, 1, 40))}
    write_report(out, manifest, spectra=given)
    assert json.loads((out / C.REPORT_JSON).read_text())["spectra"] == given
    (out / C.REPORT_JSON).unlink()
    paths = write_report(out, manifest)
    assert not (out / C.PLOT_SPECTRUM).exists() and C.PLOT_SPECTRUM not in {p.name for p in paths}


def test_energy_curve_sampling():
    s = torch.arange(1000, 0, -1, dtype=torch.float64)
    cum = torch.cumsum(s.square(), 0) / s.square().sum()
    c = energy_curve(s, points=200)
    assert len(c) == 200 and c[-1] == 1.0
    assert c == pytest.approx([float(cum[5 * (j + 1) - 1]) for j in range(200)], abs=1e-6)
    assert energy_curve(s.flip(0)[:7]) == pytest.approx(energy_curve(s[-7:]))  # order-free, short stays whole
    with pytest.raises(ValueError):
        energy_curve([])


def test_summary_table_numbers(outputs):
    manifest = read_manifest(outputs["lplr"])
    recs = manifest[C.M_TENSORS]
    comp = [r for r in recs if r["method"] == "lplr"]
    text = summary_table(manifest)
    lines = text.splitlines()
    lplr = next(line.split() for line in lines if line.startswith("lplr "))
    bits = 8 * sum(r["stored_bytes"] for r in comp) / sum(_numel(r["shape"]) for r in comp)
    assert lplr[1] == str(len(comp)) and lplr[3] == f"{bits:.2f}"
    total = next(line.split() for line in lines if line.startswith("total "))
    assert total[1] == str(len(recs))
    assert f"{sum(r['original_bytes'] for r in recs) / 1e6:,.2f} MB ->" in text
    md = summary_markdown(manifest)
    assert md.startswith("|") and f"| lplr | {len(comp)} |" in md


def test_eval_results_are_rendered(outputs, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(outputs["rtn"], out)
    manifest = copy.deepcopy(read_manifest(out))
    manifest[C.M_EVAL] = {"kind": "causal_lm", "texts": 12, "text_source": "list", "perplexity_original": 101.25,
                          "perplexity_converted": 102.5, "kl_mean": 0.00123, "top1_agreement": 0.95}
    write_report(out, manifest)
    md = (out / C.REPORT_MD).read_text()
    assert "## Fidelity" in md and "101.250 → 102.500" in md and "0.00123" in md and "95.0 %" in md
    assert json.loads((out / C.REPORT_JSON).read_text())["eval"]["kl_mean"] == 0.00123
    assert "perplexity original → converted: 101.250 → 102.500" in summary_table(manifest)


def test_compare_side_by_side(outputs, tmp_path):
    dirs = [outputs["lplr"], outputs["rtn"], outputs["grown"]]
    target = tmp_path / "cmp.md"
    text = compare(dirs, out=target)
    assert target.read_text() == text
    assert "| matrix type | lplr rel. error | lplr bits/param | rtn rel. error |" in text
    row = next(line for line in text.splitlines() if line.startswith("| all compressed |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    for i, d in enumerate(dirs):
        comp = [r for r in read_manifest(d)[C.M_TENSORS] if r["method"] != "copy"]
        p = sum(_numel(r["shape"]) for r in comp)
        assert cells[1 + 2 * i] == f"{sum(_numel(r['shape']) * r['rel_error'] for r in comp) / p:.4f}"
        assert cells[2 + 2 * i] == f"{8 * sum(r['stored_bytes'] for r in comp) / p:.2f}"
    grew = next(line for line in text.splitlines() if line.startswith("| tensors that grew |"))
    assert grew.split("|")[2].strip() == "0" and int(grew.split("|")[4]) > 0
    # Directories with the same name get distinct labels.
    twin = tmp_path / "x" / "lplr"
    shutil.copytree(outputs["lplr"], twin)
    assert "| report/lplr | x/lplr |" in compare([outputs["lplr"], twin]).replace(
        outputs["lplr"].parent.name, "report")
    with pytest.raises(LplrError):
        compare([])
    with pytest.raises(LplrError):
        compare([tmp_path])  # not an output directory


def test_compare_refuses_to_write_inside_a_conversion(outputs, tmp_path):
    """`report --out` inside a compared directory would replace one of its files or add one its manifest does not
    list; it is refused before anything is written, and the output still verifies."""
    from lplr_convert.verify import verify

    src = tmp_path / "conv"
    shutil.copytree(outputs["rtn"], src)
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    shard = next(iter(read_manifest(src)[C.M_SHARDS]))
    for out in (src / shard, src / "cmp.md", src):
        with pytest.raises(LplrError, match="inside the conversion directory"):
            compare([outputs["lplr"], src], out=out)
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
    verify(src)
    with pytest.raises(LplrError, match="is a directory"):
        compare([src], out=tmp_path)
    # The CLI: one directory with --out writes its summary there instead of re-rendering inside it.
    res = run_cli("report", "--in-path", str(src), "--out", str(tmp_path / "one.md"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "one.md").read_text() == compare([src])
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
    res = run_cli("report", "--in-path", str(src), "--out", str(src / "x.md"))
    assert res.exit_code != 0 and "--out" in res.output and not (src / "x.md").exists()


def test_report_out_replaces_nothing_but_an_earlier_comparison(outputs, tmp_path):
    """`report --out` replaced whatever was there through a temporary file and a rename: a user's weights, or (as
    root) /dev/null itself, which became a regular file. It now writes a new file or an earlier comparison only, never
    inside any directory of this tool's, and names a missing directory."""
    import os

    from lplr_testing import error_line, tree_state

    conv, other = outputs["rtn"], outputs["lplr"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"my weights")
    (mine / "link.md").symlink_to(mine / "model.safetensors")
    special = tmp_path / "special"  # a special file, like a device node (outside `protect`: reading it would block)
    special.mkdir()
    os.mkfifo(special / "pipe")
    protect = (mine, conv, other)
    cases = {mine / "model.safetensors": "is not an earlier comparison", special / "pipe": "is not an earlier comparison",
             mine / "link.md": "is not an earlier comparison", other / "cmp.md": "an output directory of lplr-convert",
             tmp_path / "missing" / "cmp.md": "does not exist"}
    for out, needle in cases.items():
        before = tree_state(*protect)
        error_line(run_cli("report", "--in-path", str(conv), "--out", str(out)), "--out", str(out), needle)
        assert tree_state(*protect) == before
    assert (special / "pipe").is_fifo() and sorted(special.iterdir()) == [special / "pipe"]
    target = tmp_path / "cmp.md"
    for _ in range(2):  # a new file, then the earlier comparison replaced
        res = run_cli("report", "--in-path", str(conv), "--in-path", str(other), "--out", str(target))
        assert res.exit_code == 0, res.output
    assert target.read_text() == compare([conv, other])


def test_without_matplotlib_the_tables_are_still_written(outputs, tmp_path, monkeypatch):
    out = tmp_path / "nomatplotlib"
    shutil.copytree(outputs["rtn"], out)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    paths = write_report(out)
    assert {p.name for p in paths} == {C.REPORT_JSON, C.REPORT_CSV, C.REPORT_MD}
    assert json.loads((out / C.REPORT_JSON).read_text())["plots"] == []


def test_spectra_are_not_read_from_a_source_replaced_since_the_conversion(outputs, tiny_llama_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(outputs["lplr"], out)
    for f in (C.REPORT_JSON, C.PLOT_SPECTRUM):
        (out / f).unlink(missing_ok=True)
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    manifest = read_manifest(out)
    manifest[C.M_SOURCE]["path"] = str(src)
    for r in manifest[C.M_TENSORS]:
        r["spectrum"] = None  # as a conversion run with --spectra off
    from safetensors.torch import load_file, save_file

    for shard in sorted(src.glob("*.safetensors")):  # the same names and shapes, other values
        save_file({k: v + 1 for k, v in load_file(str(shard)).items()}, str(shard), metadata={"format": "pt"})
    write_report(out, manifest)
    doc = json.loads((out / C.REPORT_JSON).read_text())
    assert doc["spectra"] == {} and not (out / C.PLOT_SPECTRUM).exists()
    manifest[C.M_SOURCE]["path"] = str(tiny_llama_dir)  # the source as converted: read
    write_report(out, manifest)
    assert len(json.loads((out / C.REPORT_JSON).read_text())["spectra"]) == 4


def test_a_conversion_whose_errors_predict_collapse_is_flagged_with_a_better_setting(tmp_path, tiny_llama_dir):
    """A causal LM whose compressed tensors' weight error is far above what decoders survive: the terminal summary,
    the Markdown summary (the card's) and the report say RUINED and name calibrated qlr under a budget."""
    from lplr_convert.report.metrics import RUIN_THRESHOLDS, summary_of

    out = tmp_path / "o"
    convert(ConvertOptions(in_path=str(tiny_llama_dir), out_path=str(out), write_report=False,
                           layer={"method": "lplr", "rank_fraction": 0.1}))
    manifest = read_manifest(out)
    s = summary_of(manifest)
    assert s["weighted_rel_error"] > RUIN_THRESHOLDS["causal_lm"][1]  # the premise
    text = summary_table(manifest)
    line = next(ln for ln in text.splitlines() if "RUINED" in ln)
    assert line.startswith("WARNING:") and "weight error" in line and "decoder LLM" in line
    assert "calibrate" in line and "--method qlr" in line and "--target-bits-per-param 4.25" in line
    assert "RUINED" in summary_markdown(manifest)
    write_report(out)
    assert "RUINED" in (out / C.REPORT_MD).read_text()


def test_the_verdict_reads_the_output_error_first_and_names_the_next_step():
    from lplr_convert.report.metrics import RUIN_THRESHOLDS, ruin_verdict

    out_t, w_t = RUIN_THRESHOLDS["causal_lm"]
    assert ruin_verdict({"weighted_rel_error": w_t * 0.99, "output_rel_error": None}, causal=True) is None
    v = ruin_verdict({"weighted_rel_error": w_t * 0.5, "output_rel_error": out_t * 1.01}, causal=True,
                     calibrated=True, method="qlr", target=2.25)
    assert v["measure"] == "output error" and v["advice"] == "raise the budget (--target-bits-per-param 4.25)"
    v = ruin_verdict({"weighted_rel_error": 0.9, "output_rel_error": out_t * 1.01}, causal=True, calibrated=True,
                     method="gptq")
    assert "--method qlr --target-bits-per-param 4.25 and the same --calibration" in v["advice"]
    # An encoder survives errors a decoder does not (all-MiniLM-L6-v2 against SmolLM2, NOTES.md).
    enc_out, enc_w = RUIN_THRESHOLDS["encoder"]
    assert enc_out > out_t and enc_w >= w_t
    assert ruin_verdict({"weighted_rel_error": 0.9, "output_rel_error": out_t * 1.01}, causal=False) is None


def test_eval_says_ruined_from_the_measured_perplexity_or_cosine():
    from lplr_convert.report.tables import eval_items

    def verdict(ev):
        return dict(eval_items(ev))["verdict"]

    lm = {"kind": "causal_lm", "perplexity_original": 12.38}
    assert verdict({**lm, "perplexity_converted": 14.77}).startswith("close (perplexity 1.19x")
    assert verdict({**lm, "perplexity_converted": 32.01}).startswith("degraded")
    assert verdict({**lm, "perplexity_converted": 340539.0}).startswith("RUINED (perplexity 27,507x")
    assert verdict({"kind": "encoder", "cosine_mean": 0.99}).startswith("close")
    assert verdict({"kind": "encoder", "cosine_mean": 0.44}) == "RUINED (mean cosine 0.440)"
