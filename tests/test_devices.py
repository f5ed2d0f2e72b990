"""--device: `auto` is the default of convert and eval, and the manifest / eval result record the device used."""

from __future__ import annotations

import json

import pytest
import torch
from lplr_testing import run_cli

from lplr_convert import constants as C
from lplr_convert.pipeline.convert import ConvertOptions
from lplr_convert.devices import resolve_device
from lplr_convert.errors import LplrError
from lplr_convert.evaluate import evaluate


def test_auto_is_the_gpu_when_there_is_one():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(LplrError, match="not a device"):
        resolve_device("gpu0")


def test_convert_and_eval_default_to_auto_and_record_the_device_used(tmp_path, minilm_dir):
    assert ConvertOptions("a", "b").device == "auto"
    assert evaluate.__defaults__[1] == "auto"  # (text, device, max_texts)
    out = tmp_path / "out"
    res = run_cli("--in-path", str(minilm_dir), "--out-path", str(out), "--method", "rtn", "--no-report",
                  "--include", r"layer\.0\.attention\.self\.query\.weight$")
    assert res.exit_code == 0, res.output
    used = str(resolve_device("auto"))
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    assert manifest["options"]["device"] == used  # the device itself, never the word "auto"
    res = run_cli("eval", "--original", str(minilm_dir), "--converted", str(out), "--json", "--max-texts", "4")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["device"] == used
    assert json.loads((out / C.MANIFEST_FILE).read_text())["eval"]["device"] == used
