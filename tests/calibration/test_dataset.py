"""calibrate --dataset: local datasets (save_to_disk, a folder of data files) read through the `datasets` library give
the statistics of the same text given as a file; the manifest and the resume fingerprint say which dataset, split and
column were used; unusable datasets are refused in one line, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lplr_testing import error_line, run_cli, tree_state

from lplr_convert import constants as C
from lplr_convert.calibration import calibrate
from lplr_convert.calibration.text import parse_dataset, read_dataset, read_text
from lplr_convert.errors import LplrError

datasets = pytest.importorskip("datasets")

ARGS = ("--samples", "4", "--seq-len", "24", "--batch-size", "2")


@pytest.fixture(scope="module")
def lines(text_file) -> list[str]:
    return read_text(text_file).lines


@pytest.fixture(scope="module")
def saved(lines, tmp_path_factory) -> Path:
    """A DatasetDict written by save_to_disk: train (the text's lines, with an int column), validation (reversed)."""
    path = tmp_path_factory.mktemp("ds") / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": lines, "id": list(range(len(lines)))}),
        "validation": datasets.Dataset.from_dict({"text": lines[::-1], "id": list(range(len(lines)))}),
    }).save_to_disk(str(path))
    return path


def _stats(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("lplr_stats-*.safetensors"))}


def test_parse_dataset():
    assert parse_dataset("wikitext:wikitext-2-raw-v1:train") == ("wikitext", "wikitext-2-raw-v1", "train")
    assert parse_dataset("allenai/c4:en:train[:2000]") == ("allenai/c4", "en", "train[:2000]")
    assert parse_dataset("./corpus::validation") == ("./corpus", None, "validation")
    assert parse_dataset("owner/name") == ("owner/name", None, None)
    with pytest.raises(LplrError, match="is not NAME"):
        parse_dataset("a:b:c:d")


def test_a_saved_dataset_gives_the_statistics_of_the_same_text_as_a_file(saved, lines, tiny_dir, text_file,
                                                                           tmp_path):
    src = tiny_dir("llama")
    res = run_cli("calibrate", "--in-path", str(src), "--out-path", str(tmp_path / "d"), "--dataset", str(saved),
                  *ARGS)
    assert res.exit_code == 0, res.output
    assert "(4 samples, 96 tokens)" in res.output  # 4 full chunks of 24 tokens
    file_run = calibrate(src, tmp_path / "f", text=text_file, samples=4, seq_len=24, batch_size=2)
    assert _stats(tmp_path / "d") == _stats(tmp_path / "f")  # byte-identical statistics
    m = json.loads((tmp_path / "d" / C.CALIB_MANIFEST).read_text())
    assert m["samples"] == 4 and m["tokens"] == 96 == file_run["tokens"] and m["longest_sample"] == 24
    ds = m[C.S_TEXT]["dataset"]
    assert ds["name"] == str(saved.resolve()) and ds["split"] == "train" and ds["column"] == "text"
    assert ds["config"] is None and ds["rows"] == len(lines) and ds["fingerprint"]
    assert m[C.S_TEXT]["source"] == str(saved) and len(m[C.S_TEXT]["sha256"]) == 64


def test_split_and_column_choice(saved, lines, tmp_path):
    val = read_dataset(f"{saved}::validation")
    assert list(val.lines) == lines[::-1] and val.dataset["split"] == "validation"
    assert read_dataset(str(saved)).dataset["fingerprint"] != val.dataset["fingerprint"]
    # a folder of .jsonl files: load_dataset reads it; the only string column is taken, whatever its name
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "part.jsonl").write_text("".join(json.dumps({"body": s, "n": i}) + "\n" for i, s in enumerate(lines)),
                                       encoding="utf-8")
    text = read_dataset(str(folder))
    assert list(text.lines) == lines and text.dataset["column"] == "body" and text.dataset["split"] == "train"
    assert text.lines[2] == lines[2] and text.lines[1:3] == lines[1:3] and len(text.lines) == len(lines)
    # two string columns, no 'text': --text-column picks one
    two = tmp_path / "two"
    datasets.Dataset.from_dict({"title": ["t"] * 3, "body": lines[:3]}).save_to_disk(str(two))
    assert list(read_dataset(str(two), "body").lines) == lines[:3]


@pytest.mark.parametrize("case,needles", [
    ("missing", ("does not exist", "save_to_disk")),
    ("file", ("is a file", "--text")),
    ("no text column", ("has no text column", "--text-column")),
    ("several text columns", ("several text columns", "--text-column")),
    ("bad column", ("has no column 'body'", "--text-column")),
    ("int column", ("not text", "--text-column")),
    ("bad split", ("has no split 'test'", "validation")),
    ("config on a saved dataset", ("has no configs", "::SPLIT")),
    ("too short", ("gives 1 sample(s)", "fewer than the 4 samples of 24 tokens asked", "--samples")),
    ("text and dataset", ("two sources of calibration text",)),
])
def test_unusable_datasets_are_one_line_errors_and_write_nothing(case, needles, saved, tiny_dir, text_file,
                                                                 tmp_path):
    ds = tmp_path / "ds"
    extra: tuple[str, ...] = ()
    spec = str(ds)
    if case == "missing":
        spec = str(tmp_path / "nothing")
    elif case == "file":
        spec = str(text_file)
    elif case == "no text column":
        datasets.Dataset.from_dict({"n": [1, 2]}).save_to_disk(spec)
    elif case == "several text columns":
        datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]}).save_to_disk(spec)
    elif case in ("bad column", "int column"):
        datasets.Dataset.from_dict({"text": ["x"], "id": [1]}).save_to_disk(spec)
        extra = ("--text-column", "body" if case == "bad column" else "id")
    elif case == "bad split":
        spec = f"{saved}::test"
    elif case == "config on a saved dataset":
        spec = f"{saved}:cfg:train"
    elif case == "too short":
        datasets.Dataset.from_dict({"text": ["a few words only"]}).save_to_disk(spec)
    elif case == "text and dataset":
        spec, extra = str(saved), ("--text", str(text_file))
    before = tree_state(tmp_path)
    res = run_cli("calibrate", "--in-path", str(tiny_dir("llama")), "--out-path", str(tmp_path / "out"),
                  "--dataset", spec, *extra, *ARGS)
    error_line(res, *needles)
    assert tree_state(tmp_path) == before


def test_a_short_text_file_is_used_with_a_warning_and_recorded(tiny_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("only a few words here\n", encoding="utf-8")
    res = run_cli("calibrate", "--in-path", str(tiny_dir("llama")), "--out-path", str(tmp_path / "s"),
                  "--text", str(text), *ARGS)
    assert res.exit_code == 0, res.output
    assert "gives 1 sample(s) of at most" in res.stderr and "shorter than seq_len 24" in res.stderr
    m = json.loads((tmp_path / "s" / C.CALIB_MANIFEST).read_text())
    assert m["samples"] == 1 and m["samples_requested"] == 4 and m["longest_sample"] == m["tokens"] < 24


def test_resume_refuses_another_split(saved, tiny_dir, tmp_path, monkeypatch):
    """An interrupted --dataset run resumed with another split of the same directory (same files, so the same sha256)
    is refused, naming the dataset."""
    from lplr_convert.calibration import run

    real, calls = run.save_block, []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "out"
    args = ("--in-path", str(tiny_dir("llama")), "--out-path", str(out), *ARGS)
    monkeypatch.setattr(run, "save_block", interrupt_second)
    assert run_cli("calibrate", *args, "--dataset", str(saved)).exit_code == 130  # interrupted
    monkeypatch.setattr(run, "save_block", real)
    assert (out / C.CALIB_PROGRESS).is_file()
    error_line(run_cli("calibrate", *args, "--dataset", f"{saved}::validation", "--resume"),
               "the calibration dataset (name, config, split, column or fingerprint) changed")
    res = run_cli("calibrate", *args, "--dataset", str(saved), "--resume")
    assert res.exit_code == 0 and "resuming: 1 of 2 block run(s) kept" in res.stderr, res.output
