"""The STATS directory: the bundled MiniLM end to end, the loader's checks, and what calibrate refuses."""

from __future__ import annotations

import json

import pytest
import torch

from lplr_convert import constants as C
from lplr_convert.calibration import calibrate, load_calibration
from lplr_convert.calibration.text import load_tokenizer, read_text
from lplr_convert.errors import LplrError
from lplr_convert.io.reader import open_source

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def minilm_stats(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_stats") / "stats"
    return out, calibrate("bundled:all-MiniLM-L6-v2", out, samples=16, seq_len=64, batch_size=8)


def test_minilm_statistics_are_psd_with_right_shapes_and_counts(minilm_stats, minilm_dir):
    out, manifest = minilm_stats
    tok = load_tokenizer(minilm_dir)
    tokens = sum(len(tok(s, truncation=True, max_length=64)["input_ids"]) for s in read_text().lines[:16])
    assert manifest["samples"] == 16 and manifest["tokens"] == tokens and manifest["dtype"] == "float32"
    assert manifest[C.S_TEXT]["packing"] == "lines"
    stats = load_calibration(out)
    assert len(manifest[C.S_STATISTICS]) == 6 * 4 and len(stats.weights) == 6 * 6
    for name in stats.weights:
        H = stats.statistic(name).double()
        assert H.shape == ((1536, 1536) if name.endswith("output.dense.weight") and ".attention." not in name
                           else (384, 384))
        assert torch.equal(H, H.T) and stats.tokens(name) == tokens
        # float32 round-off of a mean of `tokens` products, stored in float32: |E_ij| <= (tokens + 1) eps
        # sqrt(H_ii H_jj), so ||E||_2 <= ||E||_F <= (tokens + 1) eps tr(H) bounds how negative an eigenvalue can be;
        # H + that * I is then positive definite (a Cholesky factorization, 40x cheaper than eigvalsh here)
        shift = (tokens + 1) * EPS32 * H.trace()
        assert torch.linalg.cholesky_ex(H + shift * torch.eye(H.shape[0], dtype=H.dtype)).info == 0
        assert H.trace() > 0
    q = "encoder.layer.3.attention.self.query.weight"
    assert stats.key(q) == stats.key(q.replace("query", "value")) == "encoder.layer.3.attention.self.query.input_moment"


def test_manifest_records_the_source_and_the_text(minilm_stats, minilm_dir):
    from lplr_convert.io.manifest import sha256_file

    _, m = minilm_stats
    assert m[C.M_SOURCE]["model_type"] == "bert" and m[C.M_SOURCE]["path"] == "bundled:all-MiniLM-L6-v2"
    assert m[C.M_SOURCE][C.M_FILES]["model.safetensors"]["sha256"] == sha256_file(minilm_dir / "model.safetensors")
    assert m[C.S_TEXT]["sha256"] == read_text().sha256 and m[C.S_TEXT]["source"].endswith("calibration_text.txt")
    assert m[C.S_WEIGHTS]["encoder.layer.0.output.dense.weight"]["shape"] == [1536, 1536]


def test_check_source_and_require(minilm_stats, tiny_dir):
    out, _ = minilm_stats
    stats = load_calibration(out)
    stats.check_source(open_source("bundled:all-MiniLM-L6-v2"))
    for other in ("gpt2", "llama"):  # same file name but other bytes; other files
        with pytest.raises(LplrError, match="made from a different checkpoint.*re-run `lplr-convert calibrate`"):
            stats.check_source(open_source(str(tiny_dir(other))))
    stats.require(["encoder.layer.0.intermediate.dense.weight"])
    with pytest.raises(LplrError, match="none for embeddings.word_embeddings.weight"):
        stats.require(["encoder.layer.0.intermediate.dense.weight", "embeddings.word_embeddings.weight", "x"])


def test_damaged_stats_file_is_refused(tiny_dir, text_file, tmp_path):
    calibrate(tiny_dir("bert"), tmp_path / "s", text=text_file, samples=2, seq_len=16)
    with open(tmp_path / "s" / "lplr_stats-00001.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    stats = load_calibration(tmp_path / "s")
    stats.statistic("encoder.layer.0.intermediate.dense.weight")
    with pytest.raises(LplrError, match="does not match the sha256"):
        stats.statistic("encoder.layer.1.intermediate.dense.weight")


@pytest.mark.parametrize("kw,words", [({"samples": 0}, "samples must be an integer >= 1"),
                                      ({"batch_size": 0}, "batch_size"), ({"seq_len": 1}, "seq_len"),
                                      ({"accumulate_dtype": torch.float16}, "accumulate_dtype .* use float32 or float64"),
                                      ({"device": "nonsense"}, "device")])
def test_bad_options_are_one_line_errors(kw, words, tiny_dir, tmp_path):
    with pytest.raises(LplrError, match=words) as e:
        calibrate(tiny_dir("bert"), tmp_path / "s", **kw)
    assert "\n" not in str(e.value) and not (tmp_path / "s").exists()


def test_bad_text_and_missing_tokenizer(tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "t.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(LplrError, match="no usable line"):
        calibrate(tiny_dir("bert"), tmp_path / "s", text=tmp_path / "empty.txt")
    with pytest.raises(LplrError, match="no string field 'text'"):
        calibrate(tiny_dir("bert"), tmp_path / "s", text=tmp_path / "t.jsonl")
    src = tmp_path / "notok"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        (src / f).write_bytes((tiny_dir("bert") / f).read_bytes())
    with pytest.raises(LplrError, match="no tokenizer files.*copy the model's tokenizer files"):
        calibrate(src, tmp_path / "s")


def test_out_dir_rules(tiny_dir, text_file, tmp_path):
    path, out = tiny_dir("gpt2"), tmp_path / "s"
    kw = {"text": text_file, "samples": 2, "seq_len": 16}
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(LplrError, match="not empty; pass overwrite"):
        calibrate(path, out, **kw)
    with pytest.raises(LplrError, match="holds no earlier calibration statistics"):
        calibrate(path, out, overwrite=True, **kw)
    (out / "notes.txt").unlink()
    calibrate(path, out, **kw)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (out / "lplr_stats-00007.safetensors.partial").write_bytes(b"left over")
    with pytest.raises(LplrError, match="not empty"):
        calibrate(path, out, **kw)
    with pytest.raises(LplrError, match="notes.txt.*will not delete"):  # never mixed into, nor deleted with, STATS
        calibrate(path, out, overwrite=True, **kw)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    (out / "notes.txt").unlink()
    m = calibrate(path, out, overwrite=True, **{**kw, "samples": 3})
    names = sorted(p.name for p in out.iterdir())
    assert names == ["lplr_calibration.json", "lplr_stats-00000.safetensors", "lplr_stats-00001.safetensors"]
    assert json.loads((out / C.CALIB_MANIFEST).read_text())["samples"] == m["samples"] == 3
    for inside in (path, path / "stats", path.parent):  # the source itself, inside it, or around it
        with pytest.raises(LplrError, match="the input"):
            calibrate(path, inside, overwrite=True, **kw)
    assert not (path / "stats").exists()


def test_calibrate_holds_the_output_lock_and_refuses_records_naming_outside_files(tiny_dir, text_file, tmp_path):
    """A second writer of the same STATS directory gets the lock error (nothing changed); a calibration manifest
    naming a file outside its directory makes --overwrite delete nothing outside it."""
    from lplr_testing import tree_state

    from lplr_convert.io.outdir import OutputLock

    path, out, sibling = tiny_dir("gpt2"), tmp_path / "s", tmp_path / "sibling"
    kw = {"text": text_file, "samples": 2, "seq_len": 16}
    calibrate(path, out, **kw)
    sibling.mkdir()
    (sibling / "notes.txt").write_text("mine", encoding="utf-8")
    before = tree_state(path, out, sibling)
    with OutputLock(out), pytest.raises(LplrError, match="being written by another run"):
        calibrate(path, out, overwrite=True, **kw)
    assert tree_state(path, out, sibling) == before
    doc = json.loads((out / C.CALIB_MANIFEST).read_text())
    doc[C.M_FILES]["../sibling/notes.txt"] = {"sha256": "0" * 64, "bytes": 4}
    (out / C.CALIB_MANIFEST).write_text(json.dumps(doc))
    before = tree_state(path, sibling)
    calibrate(path, out, overwrite=True, **kw)
    assert tree_state(path, sibling) == before
    load_calibration(out)


def _outside(doc, root):  # the first statistics file moved out of the STATS directory, the manifest pointing there
    first = min(doc[C.M_FILES])
    (root / first).rename(root.parent / "moved.safetensors")
    doc[C.M_FILES]["../moved.safetensors"] = doc[C.M_FILES].pop(first)
    for v in doc[C.S_STATISTICS].values():
        v["file"] = "../moved.safetensors" if v["file"] == first else v["file"]


def _linked(doc, root):  # the first statistics file replaced by a link to a copy outside
    first = root / min(doc[C.M_FILES])
    first.rename(root.parent / "moved.safetensors")
    first.symlink_to(root.parent / "moved.safetensors")


MALFORMED = {
    "file outside": (_outside, "not a file of the STATS directory"),
    "link outside": (_linked, "a link to"),
    "no statistics": (lambda d, r: d.pop(C.S_STATISTICS), "statistics is not a mapping"),
    "no weights": (lambda d, r: d.pop(C.S_WEIGHTS), "weights is not a mapping"),
    "statistic not a record": (lambda d, r: d.update({C.S_STATISTICS: dict.fromkeys(d[C.S_STATISTICS], 5)}),
                               "statistics is not a mapping"),
    "files a list": (lambda d, r: d.update({C.M_FILES: []}), "files is not a mapping"),
    "weight without statistic": (lambda d, r: d.update({C.S_WEIGHTS: {k: {} for k in d[C.S_WEIGHTS]}}),
                                 "names no listed statistic"),
    "no source": (lambda d, r: d.pop(C.M_SOURCE), "source.files is not a mapping"),
    "statistic naming a list": (lambda d, r: [v.update(file=[1]) for v in d[C.S_STATISTICS].values()],
                                "names no listed file"),
    "weight naming a dict": (lambda d, r: [v.update(statistic={}) for v in d[C.S_WEIGHTS].values()],
                             "names no listed statistic"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_or_escaping_stats_manifest_is_named(tiny_dir, text_file, tmp_path, case):
    """convert --calibration with such a STATS directory read a statistics file from outside it (exit 0) or failed
    with 'unexpected KeyError/TypeError/AttributeError'; now one line names the manifest or the file, before the
    output directory holds anything."""
    from lplr_testing import error_line, run_cli, tree_state

    src, root = tiny_dir("bert"), tmp_path / "stats" / "s"
    calibrate(src, root, text=text_file, samples=2, seq_len=16)
    doc = json.loads((root / C.CALIB_MANIFEST).read_text())
    change, needle = MALFORMED[case]
    change(doc, root)
    (root / C.CALIB_MANIFEST).write_text(json.dumps(doc))
    before = tree_state(src, root.parent)
    out = tmp_path / "out"
    error_line(run_cli("--in-path", str(src), "--out-path", str(out), "--calibration", str(root), "--method", "gptq",
                       "--no-report"), needle)
    assert tree_state(src, root.parent) == before and not (out / C.MANIFEST_FILE).exists()


def test_the_command_defaults_to_auto_and_records_the_device_it_used(tiny_dir, text_file, tmp_path):
    from lplr_testing import run_cli

    assert "[default: auto]" in " ".join(run_cli("calibrate", "--help").output.split())
    out = tmp_path / "s"
    res = run_cli("calibrate", "--in-path", str(tiny_dir("bert")), "--out-path", str(out), "--text", str(text_file),
                  "--samples", "2", "--seq-len", "16")
    assert res.exit_code == 0, res.output
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((out / C.CALIB_MANIFEST).read_text())["device"].split(":")[0] == expected


def test_the_output_is_refused_before_the_source_is_hashed_or_run(tiny_dir, text_file, tmp_path, monkeypatch):
    """A bad --out-path is a one-line error at once, not after the source's files are hashed and its embeddings run
    (minutes on a large model)."""
    from lplr_convert.calibration import run

    def never(*a, **kw):
        raise AssertionError("the source was hashed before the output was checked")

    monkeypatch.setattr(run, "source_files", never)
    out = tmp_path / "s"
    out.mkdir()
    (out / "mine.txt").write_text("user file")
    for kw, needle in (({}, "is not empty"), ({"overwrite": True}, "holds no earlier"),
                       ({"resume": True}, "is not an interrupted run")):
        with pytest.raises(LplrError, match=needle):
            calibrate(tiny_dir("bert"), out, text=text_file, samples=2, seq_len=16, **kw)
    with pytest.raises(LplrError, match="inside"):
        calibrate(tiny_dir("bert"), tiny_dir("bert") / "stats", text=text_file, samples=2, seq_len=16)
    assert (out / "mine.txt").read_text() == "user file" and not (tiny_dir("bert") / "stats").exists()
