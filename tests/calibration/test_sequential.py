"""Sequential calibration: block i's statistics come from the outputs of blocks < i carrying their compressed weights
(as a conversion decodes them), i.e. they equal a plain calibration of the checkpoint whose earlier blocks were
replaced by those weights."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from lplr_convert import constants as C
from lplr_convert.calibration import calibrate, load_calibration
from lplr_convert.pipeline.convert import ConvertOptions
from lplr_convert.pipeline.sequential import CompressedBlocks, calibrate_sequential

KW = {"samples": 4, "seq_len": 24, "batch_size": 2}


def test_sequential_statistics_follow_the_compressed_blocks(tiny_dir, text_file, tmp_path):
    src = tiny_dir("llama")
    # 2-bit GPTQ on the symmetric absmax grid: coarse enough that block 1's inputs move beyond the tolerance below
    # (gptq's default asymmetric + MSE grid at 2 bits moves them less on this tiny model)
    opts = ConvertOptions(in_path=str(src), out_path=str(tmp_path / "conv"),
                          layer={"method": "gptq", "b0": 2, "scheme": "symmetric", "clip": None})
    plain = calibrate(src, tmp_path / "plain", text=text_file, **KW)
    seq = calibrate_sequential(opts, tmp_path / "seq", text=text_file, **KW)
    assert seq["sequential"]["method"] == "gptq" and plain["sequential"] is None
    assert json.loads((tmp_path / "seq" / C.CALIB_MANIFEST).read_text())["sequential"] == seq["sequential"]
    P, S = load_calibration(tmp_path / "plain"), load_calibration(tmp_path / "seq")
    block0 = [n for n in P.weights if ".layers.0." in n]
    block1 = [n for n in P.weights if ".layers.1." in n]
    assert block0 and block1
    for n in block0:  # the first block sees the embeddings either way
        assert torch.equal(P.statistic(n), S.statistic(n)), n
    # the checkpoint whose block 0 holds its compressed weights (from block 0's statistics, the same in both runs)
    shards = {f.name: load_file(str(f)) for f in src.glob("*.safetensors")}
    state = {n: t for shard in shards.values() for n, t in shard.items()}
    new = CompressedBlocks(opts)({n: state[n] for n in block0}, {n: P.statistic(n) for n in block0})
    assert set(new) == set(block0) and all(not torch.equal(new[n], state[n]) for n in block0)
    other = tmp_path / "other"
    shutil.copytree(src, other)
    for file, shard in shards.items():
        save_file({n: new[n].to(t.dtype).contiguous() if n in new else t for n, t in shard.items()},
                  str(other / file), metadata={"format": "pt"})
    calibrate(other, tmp_path / "ref", text=text_file, **KW)
    R = load_calibration(tmp_path / "ref")
    for n in block1:
        assert torch.allclose(S.statistic(n), R.statistic(n), rtol=1e-5, atol=1e-6), n
        assert not torch.allclose(S.statistic(n), P.statistic(n), rtol=1e-3, atol=1e-4), n


def test_calibrate_sequential_from_the_command_line(tiny_dir, text_file, tmp_path):
    """`calibrate --sequential RECIPE` writes the statistics of calibrate_sequential with that recipe, records the
    recipe, and `convert --recipe RECIPE --calibration STATS` takes them."""
    from lplr_testing import run_cli

    src, recipe = tiny_dir("llama"), tmp_path / "recipe.yaml"
    recipe.write_text("defaults: {method: gptq, b0: 2}\n", encoding="utf-8")
    res = run_cli("calibrate", "--in-path", str(src), "--out-path", str(tmp_path / "cli"), "--text", str(text_file),
                  "--samples", "4", "--seq-len", "24", "--batch-size", "2", "--sequential", str(recipe))
    assert res.exit_code == 0, res.output
    opts = ConvertOptions(in_path=str(src), out_path="", recipe=str(recipe))
    lib = calibrate_sequential(opts, tmp_path / "lib", text=text_file, **KW)
    m = json.loads((tmp_path / "cli" / C.CALIB_MANIFEST).read_text())
    assert m["sequential"] == lib["sequential"] and m["sequential"]["recipe"] == recipe.read_text(encoding="utf-8")
    for f in sorted((tmp_path / "lib").glob("lplr_stats-*.safetensors")):
        assert (tmp_path / "cli" / f.name).read_bytes() == f.read_bytes()
    res = run_cli("convert", "--in-path", str(src), "--out-path", str(tmp_path / "conv"), "--recipe", str(recipe),
                  "--calibration", str(tmp_path / "cli"), "--no-report")
    assert res.exit_code == 0, res.output
