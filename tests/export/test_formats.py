"""Export formats register by name (like methods), and an export of a method that declares nothing exportable
(`Method.layout` is None: stored as one dense tensor) is refused, naming the method."""

from __future__ import annotations

import pytest
from export_testing import convert_to

from lplr_convert import LplrError
from lplr_convert import constants as C
from lplr_convert.export import export, export_formats, get_format, register_format
from lplr_convert.export import common


def test_formats_are_registered_by_name(tmp_path, monkeypatch):
    assert export_formats() == sorted(C.EXPORT_FORMATS)
    with pytest.raises(LplrError, match="export format 'onnx' is unknown; use one of compressed-tensors, peft"):
        export(tmp_path, tmp_path / "x", "onnx")
    monkeypatch.setattr(common, "_FORMATS", dict(common._FORMATS))
    calls = []

    @register_format("probe")
    def probe(in_path, out_path, **kw):
        calls.append((in_path, out_path, kw))
        return "written"

    assert get_format("probe") is probe and "probe" in export_formats()
    assert export("a", "b", "probe") == "written"
    assert calls == [("a", "b", {"base_model": None, "max_shard_size": calls[0][2]["max_shard_size"],
                                 "overwrite": False})]
    with pytest.raises(ValueError, match="registered twice"):
        register_format("probe")(probe)


@pytest.mark.parametrize("fmt", C.EXPORT_FORMATS)
def test_a_method_that_declares_nothing_exportable_is_refused_by_name(llama32_dir, tmp_path, fmt):
    dst = convert_to(llama32_dir, tmp_path / "laser", method="laser", layers="0")
    with pytest.raises(LplrError, match="laser") as e:
        export(dst, tmp_path / "out", fmt)
    if fmt == C.CT_QUANT_METHOD:
        assert "method laser declares no packed layout" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
