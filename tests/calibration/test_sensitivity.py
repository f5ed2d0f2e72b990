"""`calibrate --sensitivity-samples`: each block linear's output sensitivity is the mean over tokens of the squared
gradient of the summed next-token loss with respect to its output, per output channel; the budget weighs tensors by
it (`math.weighted.loss_weight`)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lplr_convert import constants as C
from lplr_convert.calibration import calibrate, load_calibration
from lplr_convert.calibration.text import load_tokenizer, read_text, tokenize
from lplr_convert.cli import main
from lplr_convert.errors import LplrError
from lplr_convert.math.weighted import loss_weight

KW = {"samples": 4, "seq_len": 24, "batch_size": 2}


def _reference(src, text, samples: int) -> dict[str, torch.Tensor]:
    """{module name: mean over tokens of (dL/dy)^2 per output channel} by autograd.grad on the outputs captured in a
    plain forward of the model from_pretrained in float64 (L: summed next-token cross-entropy, one sample at a
    time)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float64).eval()
    seqs = tokenize(load_tokenizer(src), read_text(text).lines, True, KW["samples"], KW["seq_len"])[:samples]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    sums, count = {}, 0
    for seq in seqs:
        outs = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n, outs=outs: outs.__setitem__(n, o))
                 for n, m in linears.items()]
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, list(outs.values()))
        for h in hooks:
            h.remove()
        for n, g in zip(outs, grads):
            sums[n] = sums.get(n, 0) + g[0].square().sum(0)
        count += len(seq)
    return {n: s / count for n, s in sums.items()}


def test_sensitivity_is_the_mean_squared_loss_gradient_per_output_channel(tiny_dir, text_file, tmp_path):
    src = tiny_dir("llama")
    manifest = calibrate(src, tmp_path / "stats", text=text_file, sensitivity_samples=3, **KW)
    rec = manifest[C.S_SENSITIVITY]
    assert rec["samples"] == 3 and rec["tokens"] == 3 * (KW["seq_len"] - 1)
    assert C.CALIB_SENSITIVITY_FILE in manifest[C.M_FILES]
    stats = load_calibration(tmp_path / "stats")
    ref = _reference(src, text_file, 3)
    assert rec["weights"] == len(stats.weights) == len(ref) == 14
    for name in stats.weights:
        got = stats.sensitivity(name)
        want = ref[name.removesuffix(".weight")]
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got > 0).all(), name
        # float32 forward and backward against float64: agreement to a few float32 roundings
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=0), name
    # the statistics themselves are what a calibration without the pass gives, byte for byte
    calibrate(src, tmp_path / "plain", text=text_file, **KW)
    plain = load_calibration(tmp_path / "plain")
    for name in stats.weights:
        assert torch.equal(stats.statistic(name), plain.statistic(name))
    assert plain.sensitivity(next(iter(plain.weights))) is None and not plain.has_sensitivity


def test_a_modified_sensitivity_file_is_refused(tiny_dir, text_file, tmp_path):
    calibrate(tiny_dir("llama"), tmp_path / "stats", text=text_file, sensitivity_samples=1, **KW)
    path = tmp_path / "stats" / C.CALIB_SENSITIVITY_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    stats = load_calibration(tmp_path / "stats")
    with pytest.raises(LplrError, match="does not match the sha256"):
        stats.sensitivity(next(iter(stats.weights)))


def test_sensitivity_is_refused_for_an_encoder(tiny_dir, text_file, tmp_path):
    with pytest.raises(LplrError, match="sensitivity_samples.*not one"):
        calibrate(tiny_dir("bert"), tmp_path / "stats", text=text_file, sensitivity_samples=2, **KW)
    assert not (tmp_path / "stats" / C.CALIB_MANIFEST).exists()


def test_loss_weight_is_the_sensitivity_weighted_output_energy():
    """sum_o s_o (W H W^T)_oo equals mean over samples of sum_o s_o (W x)_o^2, across row blocks (1024 rows of a
    1024-wide W a block: two here)."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(1500, 1024, generator=g), torch.randn(200, 1024, generator=g)
    s = torch.rand(1500, generator=g, dtype=torch.float64)
    H = X.T @ X / X.shape[0]
    want = float((s * (X.double() @ W.double().T).square()).sum(1).mean())
    assert loss_weight(W, H, s) == pytest.approx(want, rel=1e-5)


def test_the_budget_uses_the_sensitivity_and_records_it(tiny_dir, text_file, tmp_path):
    """auto -> sensitivity with such statistics, output-error without; asking for sensitivity without it is a
    one-line error naming the fix. The objective decides the bytes, so it is recorded and fingerprinted."""
    src = tiny_dir("llama")
    runner = CliRunner()
    r = runner.invoke(main, ["calibrate", "--in-path", str(src), "--out-path", str(tmp_path / "sens"), "--text",
                             str(text_file), "--samples", "4", "--seq-len", "24", "--sensitivity-samples", "2",
                             "--device", "cpu"])
    assert r.exit_code == 0, r.output
    calibrate(src, tmp_path / "plain", text=text_file, **KW)

    def convert(stats, out, *extra):
        res = runner.invoke(main, ["--in-path", str(src), "--out-path", str(tmp_path / out), "--method", "rtn",
                                   "--calibration", str(tmp_path / stats), "--target-bits-per-param", "4.5",
                                   "--device", "cpu", "--no-report", *extra])
        return res, (json.loads((tmp_path / out / C.MANIFEST_FILE).read_text()) if res.exit_code == 0 else None)

    r, m = convert("sens", "a")
    assert r.exit_code == 0, r.output
    assert m["options"]["allocation"]["objective"] == "sensitivity" and m["options"]["budget_objective"] == "auto"
    # the allocator minimised the sensitivity-weighted sum: its estimate is sum_t loss_weight_t * error_t
    from safetensors.torch import load_file

    state = {n: t for f in src.glob("*.safetensors") for n, t in load_file(str(f)).items()}
    stats = load_calibration(tmp_path / "sens")
    alloc = m["options"]["allocation"]
    want = sum(loss_weight(state[n].float(), stats.statistic(n).float(), stats.sensitivity(n)) * c["estimated_error"]
               for n, c in alloc["choices"].items())
    assert alloc["estimated_error"] == pytest.approx(want, rel=1e-6)
    r, m = convert("sens", "b", "--budget-objective", "output-error")
    assert r.exit_code == 0 and m["options"]["allocation"]["objective"] == "output-error"
    alloc = m["options"]["allocation"]
    want = sum(state[n].numel() * c["estimated_error"] for n, c in alloc["choices"].items())
    assert alloc["estimated_error"] == pytest.approx(want, rel=1e-6)
    r, m = convert("plain", "c")
    assert r.exit_code == 0 and m["options"]["allocation"]["objective"] == "output-error"
    r, _ = convert("plain", "d", "--budget-objective", "sensitivity")
    errors = [line for line in r.output.splitlines() if line.startswith("error")]
    assert r.exit_code != 0 and len(errors) == 1 and "--sensitivity-samples" in errors[0], r.output
    assert not (tmp_path / "d" / C.MANIFEST_FILE).exists()
