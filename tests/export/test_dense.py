"""decompress's output-directory policy (shared with export): --overwrite replaces only an earlier decompress or
export, by the record it wrote, never a checkpoint of the user's."""

from __future__ import annotations

import json

from lplr_testing import error_line, run_cli, tree_state

from lplr_convert import constants as C


def _decompress(case, out, *extra):
    return run_cli("decompress", "--in-path", str(case.dst), "--out-path", str(out), *extra)


def test_overwrite_replaces_an_earlier_decompress_only(exports, tmp_path):
    case, out = exports["cases"]["rtn4_group"], tmp_path / "dense"
    assert _decompress(case, out).exit_code == 0
    first = (out / C.SAFE_SINGLE).read_bytes()
    assert _decompress(case, out).exit_code == 1  # not empty
    assert _decompress(case, out, "--overwrite").exit_code == 0
    assert (out / C.SAFE_SINGLE).read_bytes() == first  # same bytes again
    (out / "mine.txt").write_text("keep")
    res = _decompress(case, out, "--overwrite")
    assert res.exit_code == 1 and "mine.txt" in res.stderr and (out / "mine.txt").read_text() == "keep"


def test_overwrite_refuses_a_directory_without_a_checkpoint(exports, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = _decompress(exports["cases"]["rtn4_group"], out, "--overwrite")
    assert res.exit_code == 1 and "holds no earlier export or decompress" in res.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_a_checkpoint_it_did_not_write(exports, tmp_path):
    """A Hugging Face checkpoint directory (shards, index, config) that no decompress wrote is refused, although every
    file in it is named like what a decompress writes."""
    case = exports["cases"]["rtn4_group"]
    mine = tmp_path / "my_model"
    assert _decompress(case, mine).exit_code == 0
    (mine / C.EXPORT_FILE).unlink()  # now just a plain checkpoint of the user's
    before = tree_state(mine, case.dst)
    error_line(_decompress(case, mine, "--overwrite"), str(mine), "holds no earlier export or decompress")
    assert tree_state(mine, case.dst) == before


def test_export_and_decompress_replace_each_other_by_their_record(exports, tmp_path):
    case, out = exports["cases"]["rtn4_group"], tmp_path / "out"
    assert _decompress(case, out).exit_code == 0
    assert json.loads((out / C.EXPORT_FILE).read_text())["format"] == C.DENSE_EXPORT
    res = run_cli("export", "--in-path", str(case.dst), "--out-path", str(out), "--format", "compressed-tensors",
                  "--overwrite")
    assert res.exit_code == 0, res.output
    assert _decompress(case, out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(json.loads((out / C.EXPORT_FILE).read_text())["files"]
                                                           + [C.EXPORT_FILE])
