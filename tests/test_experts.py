"""Fused MoE experts (3-D [experts, a, b] tensors) on tiny models of the families transformers 5.24 ships with them:
the per-family orientation checked by a forward pass of each family's own experts module, per-expert compression,
reassembly by every loader (dense, factored, from_pretrained, decompress), the report's per-expert rows, --types,
routers left alone."""

from __future__ import annotations

import json

import pytest
import torch
from lplr_testing import run_cli

from lplr_convert import constants as C
from lplr_convert import load_model
from lplr_convert.hf.quantizer import LplrConvertConfig
from lplr_convert.io.reader import open_source
from lplr_convert.pipeline.plan import build_plan_options, make_plan
from lplr_convert.report.metrics import tensor_rows

H = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64}
E = 4
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def _families():
    import transformers as T

    def route(experts, x, e):  # the decorated experts' signature: every token to expert e with weight 1
        n = x.shape[0]
        return experts(x, torch.full((n, 1), e), torch.ones(n, 1))

    def llama4(experts, x, e):  # tokens arrive grouped per expert: [experts * tokens, hidden]
        return experts(x.repeat(E, 1)).view(E, x.shape[0], -1)[e]

    def jet(linear, x, e):  # one ParallelExperts projection, fed its own input
        return linear(x, [x.shape[0] if i == e else 0 for i in range(E)])

    jet.direct = True

    return {  # family: (build, [(experts module path, parameter, projection kind, run)], in-major)
        "gpt_oss": (lambda: T.GptOssForCausalLM(T.GptOssConfig(**H, num_local_experts=E, num_experts_per_tok=2,
                                                                head_dim=16, layer_types=["full_attention"] * 2)),
                    [("model.layers.0.mlp.experts", p, k, route) for p, k in (("gate_up_proj", "in"),
                                                                             ("down_proj", "out"))], True),
        "llama4_text": (lambda: T.Llama4ForCausalLM(T.Llama4TextConfig(
            **H, intermediate_size_mlp=128, num_local_experts=E, num_experts_per_tok=1, head_dim=16,
            interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=32)),
            [("model.layers.0.feed_forward.experts", p, k, llama4) for p, k in (("gate_up_proj", "in"),
                                                                               ("down_proj", "out"))], True),
        "granitemoe": (lambda: T.GraniteMoeForCausalLM(T.GraniteMoeConfig(**H, num_local_experts=E,
                                                                          num_experts_per_tok=2)),
                       [("model.layers.0.block_sparse_moe.experts", p, k, route) for p, k in (("gate_up_proj", "in"),
                                                                                             ("down_proj", "out"))],
                       False),
        "mistral4": (lambda: T.Mistral4ForCausalLM(T.Mistral4Config(
            **H, n_routed_experts=E, num_experts_per_tok=2, moe_intermediate_size=48, kv_lora_rank=16,
            q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
            [("model.layers.0.mlp.experts", p, k, route) for p, k in (("gate_up_proj", "in"), ("down_proj", "out"))],
            False),
        "jetmoe": (lambda: T.JetMoeForCausalLM(T.JetMoeConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16, num_local_experts=E,
            num_experts_per_tok=2, intermediate_size=96, vocab_size=96, max_position_embeddings=64)),
            [("model.layers.0.mlp.input_linear", "weight", "in", jet),
             ("model.layers.0.mlp.output_linear", "weight", "out", jet)], False),
    }


FAMILIES = ["gpt_oss", "llama4_text", "granitemoe", "mistral4", "jetmoe"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (model, saved checkpoint dir), built once."""
    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            model = _families()[family][0]().eval()
            src = tmp_path_factory.mktemp(family) / "src"
            model.save_pretrained(src)
            cache[family] = (model, src)
        return cache[family]

    return get


def _plans(src):
    s = open_source(str(src))
    return {p.name: p for p in make_plan(s.headers.values(), s.config, build_plan_options({"method": "rtn"})[0])}


def _oriented(T: torch.Tensor, e: int, transposed: bool) -> torch.Tensor:
    return T[e].T if transposed else T[e]


@pytest.mark.parametrize("family", FAMILIES)
def test_orientation_is_verified_by_each_familys_forward_pass(family, built):
    """In the orientation the plan gives an expert's matrix (out x in), keep input column j only: the expert's
    input projection must then depend on feature j of x alone, and its output projection's response must lie along
    column j. A wrong orientation keeps an output row instead and fails both."""
    model, src = built(family)
    _, probes, in_major = _families()[family]
    experts = [p for p in _plans(src).values() if p.experts]
    assert experts and all(p.experts == E and p.transposed == in_major and p.method == "rtn" for p in experts)
    g = torch.Generator().manual_seed(3)
    for path, param, kind, run in probes:
        module = model.get_submodule(path)
        T = getattr(module, param)
        e, j = 2, 5
        W = _oriented(T.detach(), e, in_major).clone()
        keep = torch.zeros(W.shape[1], dtype=torch.bool)
        keep[j] = True
        W[:, ~keep] = 0
        with torch.no_grad():
            T[e] = W.T if in_major else W
            width = W.shape[1] if kind == "in" or getattr(run, "direct", False) else H["hidden_size"]
            x1, x2 = (torch.randn(3, width, generator=g) * 0.1 for _ in range(2))
            if kind == "in":
                x2[:, j] = x1[:, j]
                assert torch.allclose(run(module, x1, e), run(module, x2, e), atol=1e-6), (family, param)
            else:
                d = run(module, x1, e) - run(module, x2, e)
                col = W[:, j] / W[:, j].norm()
                resid = d - (d @ col)[:, None] * col[None, :]
                assert d.norm() > 0 and resid.norm() < 1e-5 * d.norm(), (family, param)


@pytest.fixture(scope="module")
def converted_moe(built, tmp_path_factory):
    cache = {}

    def get(family, *args):
        key = (family, *args)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}_out") / "out"
            res = run_cli("--in-path", str(built(family)[1]), "--out-path", str(out), "--method", "rtn", "--no-report", *args)
            assert res.exit_code == 0, res.output
            cache[key] = out
        return cache[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_round_trip_through_every_loader(family, built, converted_moe, tmp_path):
    model, src = built(family)
    cls = type(model)  # Mistral4ForCausalLM has no AutoModelForCausalLM entry
    out = converted_moe(family)
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    experts = [r for r in manifest["tensors"] if r["info"].get("experts")]
    assert experts and all(len(r["info"]["experts"]) == E and r["method"] == "rtn" for r in experts)
    assert all(r["method"] == "copy" for r in manifest["tensors"] if r["matrix_type"] == "router")
    dense_dir = tmp_path / "dense"
    assert run_cli("decompress", "--in-path", str(out), "--out-path", str(dense_dir)).exit_code == 0
    with torch.no_grad():
        ref = cls.from_pretrained(src)(IDS).logits
        want = cls.from_pretrained(dense_dir)(IDS).logits  # the decompressed dense model
        for loaded in (load_model(out, factored=False), load_model(out), cls.from_pretrained(out)):
            assert torch.equal(loaded(IDS).logits, want), family
    # 8-bit per-channel RTN: each weight's relative error is 0.004-0.008 here; through two blocks the logits move
    # by about as much, so 0.05 is a loose bound that a wrong orientation or a scrambled expert order exceeds
    assert ((want - ref).norm() / ref.norm()) < 0.05, family


def test_report_lists_experts_and_types_select_them(built, converted_moe):
    out = converted_moe("gpt_oss")
    rows = tensor_rows(json.loads((out / C.MANIFEST_FILE).read_text()))
    down = [r for r in rows if ".experts.down_proj[" in r["name"]]
    assert [r["name"] for r in down[:E]] == [f"model.layers.0.mlp.experts.down_proj[{e}]" for e in range(E)]
    assert all(r["shape"] == [96, 64] and r["matrix_type"] == "fc_out" and r["rel_error"] > 0 for r in down)
    whole = json.loads((out / C.MANIFEST_FILE).read_text())["tensors"]
    rec = next(r for r in whole if r["name"] == "model.layers.0.mlp.experts.down_proj")
    per = [r for r in down if r["name"].startswith(rec["name"] + "[")]
    assert sum(r["params"] for r in per) == 4 * 96 * 64 and sum(r["stored_bytes"] for r in per) == rec["stored_bytes"]
    # the record's error is the whole tensor's: sqrt(sum of per-expert squared errors) over the whole norm
    W = open_source(str(built("gpt_oss")[1])).iter_tensors([rec["name"]])
    norms = [float(x.double().norm()) for x in next(iter(W))[1]]
    agg = (sum((r["rel_error"] * n) ** 2 for r, n in zip(per, norms)) / sum(n * n for n in norms)) ** 0.5
    assert abs(agg - rec["rel_error"]) < 1e-9
    only = converted_moe("gpt_oss", "--types", "fc_out")
    picked = {r["name"] for r in json.loads((only / C.MANIFEST_FILE).read_text())["tensors"] if r["method"] != "copy"}
    assert picked == {f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)}


def test_mixtral_per_expert_weights_through_from_pretrained(tmp_path):
    """Mixtral keeps 2-D experts.N.w1 in the checkpoint; transformers 5 fuses them on load: the quantizer decodes
    each expert's parts inside the model's own merge, and the factored attention stays factored."""
    import transformers as T

    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**H, num_local_experts=E, num_experts_per_tok=2)).eval()
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    assert run_cli("--in-path", str(tmp_path / "src"), "--out-path", str(out), "--no-report").exit_code == 0
    # the float modules (the packed default: tests/runtime/test_packed_loading.py)
    hf = T.AutoModelForCausalLM.from_pretrained(out, quantization_config=LplrConvertConfig(dequantize=True))
    ref = load_model(out, packed=False)
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, ref(IDS).logits)
    assert sum(type(m).__name__ == "LowRankLinear" for m in hf.modules()) == 8  # q, k, v, o of two blocks


def test_factored_experts_predicted_exactly_and_loaded_dense(built, tmp_path):
    """lplr on experts: inspect predicts each fused tensor's stored bytes exactly; the loaders decode the experts to
    dense (no per-expert factored module) while attention stays factored, and from_pretrained equals load_model."""
    from lplr_convert.pipeline.convert import ConvertOptions
    from lplr_convert.pipeline.inspect import inspect_checkpoint

    model, src = built("gpt_oss")
    out = tmp_path / "out"
    args = ["--method", "lplr", "--rank-fraction", "0.25", "--b1", "4", "--b2", "4", "--no-report"]
    assert run_cli("--in-path", str(src), "--out-path", str(out), *args).exit_code == 0
    layer = {"method": "lplr", "rank_fraction": 0.25, "b1": 4, "b2": 4}
    predicted = {r["name"]: r for r in inspect_checkpoint(ConvertOptions(str(src), "", layer=layer))["tensors"]}
    records = json.loads((out / C.MANIFEST_FILE).read_text())["tensors"]
    fused = [r for r in records if r["info"].get("experts")]
    assert len(fused) == 4 and all(predicted[r["name"]]["predicted_bytes"] == r["stored_bytes"] for r in fused)
    assert all(e["rank"] == 16 for r in fused for e in r["extra"]["experts"])  # ceil(0.25 * min(64, 96 or 192))
    # the float modules (the packed default: tests/runtime/test_packed_loading.py)
    factored = load_model(out, packed=False)
    hf = type(model).from_pretrained(out, quantization_config=LplrConvertConfig(dequantize=True))
    assert not any(type(m).__name__ == "LowRankLinear" for m in hf.model.layers[0].mlp.modules())
    assert sum(type(m).__name__ == "LowRankLinear" for m in hf.modules()) == 8  # q, k, v, o of two blocks
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, factored(IDS).logits)
        dense = load_model(out, factored=False)(IDS).logits
        # L(Rx) against (LR)x in float32: the same product, rounded in another order
        assert torch.allclose(factored(IDS).logits, dense, atol=1e-5)
