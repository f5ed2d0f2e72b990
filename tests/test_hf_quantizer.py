"""from_pretrained of converted directories after `import lplr_convert`: the quantizer builds the factored layers
before the weights load and decodes the stored parts, bit-identical to `load_model(DST, factored=True)`; without the
import, plain transformers fails loudly instead of loading random weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lplr_testing import run_cli

import lplr_convert
from lplr_convert import constants as C
from lplr_convert.errors import LplrError
from lplr_convert.hf.modeling import LowRankLinear

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def _float(**kwargs) -> dict:
    """from_pretrained's arguments for the float modules (transformers' `dequantize=True` convention), which this
    file compares with `load_model(DST, factored=True)`; the packed default is tested in tests/runtime."""
    from lplr_convert.hf.quantizer import LplrConvertConfig

    return {"quantization_config": LplrConvertConfig(dequantize=True), **kwargs}


@pytest.fixture(scope="module")
def conv(tmp_path_factory, tiny_llama_dir, tiny_gpt2_dir, minilm_dir):
    """(source model, method) -> converted directory, converted once per module."""
    sources = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "minilm": minilm_dir}
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str, method: str) -> Path:
        if (model, method) not in cache:
            out = tmp_path_factory.mktemp(f"{model}_{method}") / "out"
            extra = ["--rank-fraction", "0.5", "--b1", "4", "--b2", "6"] if method not in ("rtn", "gptq", "qlr") else \
                ["--rank", "4"] if method == "qlr" else []
            res = run_cli("--in-path", str(sources[model]), "--out-path", str(out), "--method", method,
                          "--no-report", *extra)
            assert res.exit_code == 0, res.output
            cache[(model, method)] = out
        return cache[(model, method)]

    return get


def _outputs(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        if family == "minilm":
            return model(input_ids=IDS + 1000, attention_mask=torch.ones_like(IDS)).last_hidden_state
        return model(IDS).logits


def _n_lowrank(model) -> int:
    return sum(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize(("family", "method"), [("llama", "lplr"), ("llama", "rtn"), ("gpt2", "lplr"),
                                                ("gpt2", "lsvd"), ("minilm", "lplr"), ("minilm", "rtn"),
                                                ("llama", "qlr"), ("gpt2", "qlr"), ("llama", "gptq")])
def test_from_pretrained_equals_load_model_bit_for_bit(conv, family, method, monkeypatch):
    from transformers import AutoModel, AutoModelForCausalLM

    dst = conv(family, method)
    ref = lplr_convert.load_model(dst, factored=True)

    def no_dense(self):
        raise AssertionError("a dense weight was formed while loading")

    monkeypatch.setattr(LowRankLinear, "to_dense", no_dense)  # loading must never build L @ R
    auto = AutoModel if family == "minilm" else AutoModelForCausalLM
    model = auto.from_pretrained(dst, **_float())
    monkeypatch.undo()
    assert type(model) is type(ref) and model.training is False
    assert _n_lowrank(model) == _n_lowrank(ref) == (0 if method in ("rtn", "gptq") else 14 if family == "llama"
                                                     else 8 if family == "gpt2" else 36)
    assert torch.equal(_outputs(model, family), _outputs(ref, family))
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters())
    assert model.config.quantization_config.to_dict()["quant_method"] == C.QUANT_METHOD


def test_sentence_transformer_loads_the_factored_model(conv, minilm_dir):
    from sentence_transformers import SentenceTransformer

    dst = conv("minilm", "rtn")
    st = SentenceTransformer(str(dst), device="cpu")
    ref = lplr_convert.load_model(dst)
    assert torch.equal(_outputs(st[0].auto_model, "minilm"), _outputs(ref, "minilm"))
    texts = ["a cat sits on the mat", "stock markets fell sharply", "the kitten rests on a rug"]
    a = st.encode(texts, convert_to_tensor=True)
    b = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, convert_to_tensor=True)
    # 8-bit per-channel RTN keeps MiniLM's embeddings at cosine ~0.9996 (README); 0.999 leaves room for 3 texts
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999
    factored = SentenceTransformer(str(conv("minilm", "lplr")), device="cpu", model_kwargs=_float())
    assert _n_lowrank(factored[0].auto_model) == 36


@pytest.mark.parametrize("kwargs", [{"device_map": "cpu"}, {"device_map": "auto"}, {"device_map": {"": "cpu"}},
                                    {"device_map": {"model": "cpu", "lm_head": "cpu"}}, {"low_cpu_mem_usage": True}])
def test_device_maps_place_the_factors(conv, kwargs):
    from transformers import AutoModelForCausalLM

    if "device_map" in kwargs:
        pytest.importorskip("accelerate")  # transformers needs it for any device_map
    dst = conv("llama", "lplr")
    model = AutoModelForCausalLM.from_pretrained(dst, **_float(**kwargs))
    assert model.model.layers[0].self_attn.q_proj.left.device == torch.device("cpu")
    assert torch.equal(_outputs(model, "llama"), _outputs(lplr_convert.load_model(dst, packed=False), "llama"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dtype_casts_factors_like_load_model(conv, dtype):
    from transformers import AutoModelForCausalLM

    dst = conv("llama", "lplr")  # stored from bf16
    model = AutoModelForCausalLM.from_pretrained(dst, **_float(dtype=dtype))
    assert model.model.layers[0].mlp.up_proj.right.dtype == dtype == model.model.norm.weight.dtype
    assert torch.equal(_outputs(model, "llama"), _outputs(lplr_convert.load_model(dst, dtype=dtype, packed=False),
                                                          "llama"))


def test_unsupported_uses_are_one_line_errors(conv, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lplr_convert.hf.quantizer import LplrConvertConfig

    dst = conv("llama", "lplr")
    disk = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
            "lm_head": "cpu"}
    pytest.importorskip("accelerate")
    with pytest.raises(LplrError, match="'disk' offload is not supported") as err:
        AutoModelForCausalLM.from_pretrained(dst, device_map=disk, offload_folder=str(tmp_path / "off"))
    assert "\n" not in str(err.value)
    with pytest.raises(LplrError, match="converts nothing"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=LplrConvertConfig())
    with pytest.raises(ValueError, match="not serializable"):
        AutoModelForCausalLM.from_pretrained(dst).save_pretrained(tmp_path / "saved")


def test_damaged_shard_is_refused(conv, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    dst = tmp_path / "copy"
    shutil.copytree(conv("llama", "rtn"), dst)
    shard = max(dst.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one bit of one stored value
    shard.write_bytes(bytes(data))
    with pytest.raises(LplrError, match=f"shard {shard.name} does not match the sha256"):
        AutoModelForCausalLM.from_pretrained(dst)


def test_tampered_config_is_refused(conv, tmp_path):
    """from_pretrained builds the model from config.json: a changed config is refused like a changed shard."""
    import shutil

    from transformers import AutoModelForCausalLM

    dst = tmp_path / "copy"
    shutil.copytree(conv("llama", "lplr"), dst)
    cfg = dst / "config.json"
    original = cfg.read_text()
    cfg.write_text(original.replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    assert cfg.read_text() != original
    with pytest.raises(LplrError, match=r"config\.json does not match the sha256"):
        AutoModelForCausalLM.from_pretrained(dst)
    cfg.write_text(original)
    AutoModelForCausalLM.from_pretrained(dst)


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter with this checkout first on the path and nothing imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lplr_convert.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=180, check=False)


def test_without_the_import_plain_transformers_fails_loudly_naming_it(conv):
    """transformers 5.24 only warns about an unknown quant_method and would leave the compressed weights random;
    the converted config.json's `transformers_weights` names a file that does not exist, so it fails instead."""
    dst = conv("minilm", "lplr")
    assert json.loads((dst / C.CONFIG_FILE).read_text())[C.CONFIG_WEIGHTS_KEY] == C.IMPORT_GUARD_FILE
    res = _fresh(f"""
        import sys
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({str(dst)!r})
        except Exception as e:
            print(type(e).__name__, e)
        try:
            from sentence_transformers import SentenceTransformer
            SentenceTransformer({str(dst)!r}, device="cpu")
        except Exception as e:
            print(type(e).__name__, e)
        print("lplr_convert imported:", "lplr_convert" in sys.modules)
        """)
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "lplr_convert imported: False", res.stderr[-2000:]
    assert len(lines) == 3 and all(f"FileNotFoundError No such file or directory: {dst / C.IMPORT_GUARD_FILE}" == ln
                                   for ln in lines[:2]), res.stdout


def test_import_stays_cheap_and_registers_in_either_order():
    res = _fresh("""
        import sys, lplr_convert
        print("transformers" in sys.modules)
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
        print(AUTO_QUANTIZER_MAPPING["lplr-convert"].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING["lplr-convert"].__name__)
        """)
    assert res.stdout.split() == ["False", "LplrConvertHfQuantizer", "LplrConvertConfig"], res.stderr[-2000:]
    res = _fresh("""
        from transformers import AutoModel
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        import lplr_convert
        print(AUTO_QUANTIZER_MAPPING["lplr-convert"].__name__)
        """)
    assert res.stdout.split() == ["LplrConvertHfQuantizer"], res.stderr[-2000:]


def test_decompressed_output_has_no_guard(conv, tmp_path):
    from transformers import AutoModel

    dense = tmp_path / "dense"
    res = run_cli("decompress", "--in-path", str(conv("minilm", "rtn")), "--out-path", str(dense))
    assert res.exit_code == 0, res.output
    config = json.loads((dense / C.CONFIG_FILE).read_text())
    assert C.CONFIG_WEIGHTS_KEY not in config and "quantization_config" not in config
    assert not any(isinstance(m, LowRankLinear) for m in AutoModel.from_pretrained(dense).modules())


@pytest.mark.parametrize("method", ["lsvd", "rtn"])
def test_modules_transformers_keeps_in_float32_stay_float32(tmp_path, method):
    """T5 in float16: transformers keeps `wo` in float32 (`_keep_in_fp32_modules`); every loader does the same, so
    load_model(factored=False) equals plain transformers on the decompressed output bit for bit (it ran wo in
    float16 before, 6e-4 of the output scale off)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(d_model=64, d_ff=96, num_layers=1, num_heads=4, d_kv=16, vocab_size=96)) \
        .to(torch.float16).save_pretrained(tmp_path / "src")
    dst, dense = tmp_path / "dst", tmp_path / "dense"
    extra = ["--rank-fraction", "0.9", "--b1", "8", "--b2", "8"] if method == "lsvd" else []
    for args in (["--in-path", str(tmp_path / "src"), "--out-path", str(dst), "--method", method, "--no-report", *extra],
                 ["decompress", "--in-path", str(dst), "--out-path", str(dense)]):
        res = run_cli(*args)
        assert res.exit_code == 0, res.output
    models = {"from_pretrained": T5ForConditionalGeneration.from_pretrained(dst, **_float()),
              "factored": lplr_convert.load_model(dst, factored=True),
              "dense": lplr_convert.load_model(dst, factored=False),
              "plain": T5ForConditionalGeneration.from_pretrained(dense)}
    for name, model in models.items():
        wo = model.encoder.block[0].layer[1].DenseReluDense.wo
        assert {p.dtype for p in wo.parameters()} == {torch.float32}, name
        assert model.encoder.block[0].layer[1].DenseReluDense.wi.weight.dtype == torch.float16, name
    ids = {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}
    with torch.no_grad():
        out = {name: model(**ids).logits for name, model in models.items()}
    assert torch.equal(out["from_pretrained"], out["factored"]) and torch.equal(out["dense"], out["plain"])
