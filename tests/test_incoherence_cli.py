"""`convert --incoherence hadamard` end to end on a tiny real Llama: recorded per tensor (the knob in the settings, the
seed in the info), every loader returns the original-basis weight (load_state_dict, decompress, load_model packed and
float, from_pretrained: equal greedy tokens), verify passes, the exports refuse it in one line, a resume with the knob
changed is refused, and bad values are one-line errors."""

from __future__ import annotations

import signal

import pytest
import torch
from lplr_testing import error_line, refused_in_one_line, run_cli, run_cli_child, tampered_copy

import lplr_convert
from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest
from lplr_convert.runtime.modules import PackedLinear

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
ARGS = {"gptq": ["--method", "gptq", "--b0", "4", "--quantizer", "group", "--group-size", "32"],
        "qlr": ["--method", "qlr", "--rank", "4", "--b0", "3"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama_dir):
    cache = {}

    def get(method):
        if method not in cache:
            out = tmp_path_factory.mktemp(f"incoh_{method}") / "out"
            res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--no-report", *ARGS[method],
                          "--incoherence", "hadamard")
            assert res.exit_code == 0, res.output
            cache[method] = out
        return cache[method]

    return get


@pytest.mark.parametrize("method", ["gptq", "qlr"])
def test_recorded_per_tensor_and_every_loader_gives_the_original_basis(converted, method, tmp_path):
    from transformers import AutoModelForCausalLM

    out = converted(method)
    doc = read_manifest(out)
    recs = [r for r in doc["tensors"] if r["method"] == method]
    assert recs
    # a 1.x reader would decode the rotated weights as they are: the output says 2.0 so that it refuses instead
    assert doc[C.M_FORMAT_VERSION] == C.FORMAT_VERSION_TRANSFORMED == "2.0"
    for r in recs:
        assert r["settings"]["incoherence"] == "hadamard"
        assert r["info"][C.INFO_INCOHERENCE] == {"kind": "hadamard", "seed": r["seed"]}
    dense = lplr_convert.load_state_dict(out)
    packed = lplr_convert.load_model(out)
    floats = lplr_convert.load_model(out, packed=False)
    hf = AutoModelForCausalLM.from_pretrained(out)
    mods = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert len(mods) == len(recs) and all(m.transform is not None for m in mods.values())
    for name, mod in mods.items():
        # the float loader's weights up to rounding: the int4pack kernel holds the scales in bfloat16 (relative
        # 2^-9 each, a norm the rotation keeps) and both are cast to bfloat16 (2^-8 each)
        got, want = mod.to_dense(torch.bfloat16).float(), dense[f"{name}.weight"].float()
        assert (got - want).norm() <= 2 ** -6 * want.norm()
    with torch.no_grad():
        a, b, c = packed(IDS).logits.float(), floats(IDS).logits.float(), hf(IDS).logits.float()
    assert torch.equal(a, c)  # from_pretrained builds the same packed modules
    assert (a - b).abs().max() <= 0.05 * b.abs().max()  # bfloat16 model: packed vs float modules, rounding only
    gen = [m.generate(IDS, max_new_tokens=8, do_sample=False) for m in (packed, floats, hf)]
    assert torch.equal(gen[0], gen[1]) and torch.equal(gen[0], gen[2])
    assert run_cli("verify", "--in-path", str(out)).exit_code == 0
    dec = tmp_path / "dense"
    assert run_cli("decompress", "--in-path", str(out), "--out-path", str(dec)).exit_code == 0
    from safetensors.torch import load_file

    written = {}
    for f in dec.glob("*.safetensors"):
        written |= load_file(f)
    assert all(torch.equal(written[k], v) for k, v in dense.items() if k in written)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "peft"])
def test_exports_refuse_an_incoherent_tensor_in_one_line(converted, fmt, tmp_path):
    out = tmp_path / "export"
    error_line(run_cli("export", "--in-path", str(converted("qlr")), "--out-path", str(out), "--format", fmt),
               "stored with --incoherence hadamard", "re-convert without --incoherence", "lplr-convert decompress")
    assert not out.exists()


def test_method_help_lists_the_knob_for_gptq_and_qlr_only():
    for method in ("gptq", "qlr"):
        assert "--incoherence" in run_cli("convert", "--method", method, "--help").output
    assert "--incoherence" not in run_cli("convert", "--method", "rtn", "--help").output


def test_bad_values_are_one_line_errors(tiny_llama_dir, tmp_path):
    base = ["--in-path", str(tiny_llama_dir), "--out-path", str(tmp_path / "o"), "--no-report"]
    error_line(run_cli(*base, "--method", "gptq", "--incoherence", "random"), "--incoherence", "random", "hadamard")
    assert not (tmp_path / "o").exists()
    # a method without the knob warns and ignores it, as for every other knob (nothing is rotated)
    res = run_cli(*base, "--method", "rtn", "--incoherence", "hadamard")
    assert res.exit_code == 0 and "--incoherence do(es) not apply to --method rtn" in res.output
    assert not any(C.INFO_INCOHERENCE in r["info"] for r in read_manifest(tmp_path / "o")["tensors"])


def test_a_malformed_seed_in_the_manifest_is_refused_in_one_line(converted, tmp_path):
    def seed(rec):
        rec["info"][C.INFO_INCOHERENCE]["seed"] = "lots"

    bad, name = tampered_copy(converted("gptq"), tmp_path / "bad", seed)
    refused_in_one_line((lambda: lplr_convert.load_model(bad), lambda: lplr_convert.load_state_dict(bad)),
                        f"{name}.*incoherence seed 'lots'")


def test_resume_with_the_knob_changed_is_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--in-path", str(tiny_llama_dir), "--out-path", str(out), "--max-shard-size", "30KB", "--no-report",
            *ARGS["gptq"], "--incoherence", "hadamard"]
    assert run_cli_child(*args, KILL_AT="3").returncode == -signal.SIGKILL
    error_line(run_cli(*args[:-2], "--resume"), "--incoherence changed")
    assert run_cli(*args, "--resume").exit_code == 0
