"""decompress's output-directory policy (shared with export): --overwrite replaces only an earlier decompress."""

from __future__ import annotations

from lplr_testing import run_cli

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
    assert res.exit_code == 1 and "holds no earlier decompress" in res.stderr
    assert (out / "notes.txt").read_text() == "mine"
