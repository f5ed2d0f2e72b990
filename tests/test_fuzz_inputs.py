"""Property: whatever safetensors header, index, config.json or recipe a source brings, `inspect` and `convert` end in
success or an LplrError (one line), never another exception, and a conversion that succeeds verifies against its
source. Deterministic (derandomize) and small: a few dozen tiny inputs per kind."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lplr_testing import tiny_checkpoint

from lplr_convert import LplrError
from lplr_convert import constants as C
from lplr_convert.pipeline.convert import ConvertOptions, convert
from lplr_convert.dtypes import ST_DTYPES
from lplr_convert.pipeline.inspect import inspect_checkpoint
from lplr_convert.verify import verify

NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
         "model.layers.0.mlp.up_proj.weight.lplr_left.scale", "model.layers.1.mlp.down_proj.weight"]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _outcome(tmp: Path, in_path: Path, recipe: Path | None = None, on_nonfinite: str = "error") -> str:
    """'refused' (an LplrError from inspect or convert) or 'converted' (and verified); any other exception fails."""
    opts = ConvertOptions(in_path=str(in_path), out_path=str(tmp / "out"), recipe=recipe and str(recipe),
                          on_nonfinite=on_nonfinite, write_report=False)
    try:
        inspect_checkpoint(opts)
    except LplrError as e:
        assert str(e) and "\n" not in str(e)
    try:
        convert(opts)
    except LplrError as e:
        assert str(e) and "\n" not in str(e)
        assert not (tmp / "out" / C.MANIFEST_FILE).exists()
        event("refused")
        return "refused"
    verify(tmp / "out", source=str(in_path), sample=100)  # an LplrError here fails the test
    event("converted")
    return "converted"


def _base(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    return tiny_checkpoint(path, {NAMES[0]: torch.randn(16, 8, generator=g), NAMES[1]: torch.randn(8, 8, generator=g),
                                  NAMES[2]: torch.ones(8)})


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=True) |
                     st.text(max_size=6) | st.sampled_from(["llama", "gpt2", "rtn", "lplr", "laser", ".*", "mlp"]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=8)

# --- safetensors headers -------------------------------------------------------------------------------------------
_ENTRY = st.tuples(st.sampled_from(NAMES), st.sampled_from([*ST_DTYPES, "F8_E4M3", "Q4"]),
                   st.lists(st.integers(-1, 9), max_size=3), st.binary(max_size=8))
_MUTATION = st.sampled_from(["none", "none", "none", "shift", "truncate", "pad", "list", "bad_utf8", "nest"])


def _safetensors(entries, mutation: str, seed: int) -> bytes:
    header, blobs, pos = {}, [], 0
    g = torch.Generator().manual_seed(seed)
    for name, code, shape, noise in entries:
        n = 1
        for d in shape:
            n *= d
        nbytes = max(n, 0) * (ST_DTYPES[code].itemsize if code in ST_DTYPES else 1)
        data = (torch.randn(max(nbytes // 4 + 1, 1), generator=g) * 10.0 ** (noise[0] % 40 if noise else 0))
        blob = data.numpy().tobytes()[:nbytes] if not noise or noise[-1] % 3 else (bytes(noise) * nbytes)[:nbytes]
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + len(blob)]}
        blobs.append(blob)
        pos += len(blob)
    raw = json.dumps(header).encode()
    data = b"".join(blobs)
    if mutation == "shift" and header:
        raw = raw.replace(b'"data_offsets": [0,', b'"data_offsets": [1,')
    elif mutation == "list":
        raw = json.dumps(list(header)).encode()
    elif mutation == "bad_utf8":
        raw = raw.replace(b"model", b"mod\xffl", 1)
    elif mutation == "nest":
        raw = b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    out = struct.pack("<Q", len(raw)) + raw + data
    return out[:-3] if mutation == "truncate" else out + b"\0" * 4 if mutation == "pad" else out


@FUZZ
@given(entries=st.lists(_ENTRY, min_size=1, max_size=3), mutation=_MUTATION, seed=st.integers(0, 3),
       on_nonfinite=st.sampled_from(["error", "copy"]))
def test_fuzzed_safetensors_headers(tmp_path_factory, entries, mutation, seed, on_nonfinite):
    tmp = tmp_path_factory.mktemp("st")
    src = tmp / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(_safetensors(entries, mutation, seed))
    (src / C.CONFIG_FILE).write_text('{"model_type": "llama"}')
    _outcome(tmp, src, on_nonfinite=on_nonfinite)


# --- indexes -------------------------------------------------------------------------------------------------------
_SHARD = st.sampled_from(["model.safetensors", "../model.safetensors", "/etc/passwd", "missing.safetensors", "",
                          "./model.safetensors", "config.json"])
_MOSTLY_RIGHT = st.sampled_from(["model.safetensors"] * 6) | _SHARD
_WEIGHT_MAP = (st.fixed_dictionaries({n: _MOSTLY_RIGHT for n in NAMES[:3]}, optional={NAMES[3]: _SHARD})
               | st.dictionaries(st.sampled_from(NAMES), _SHARD | _JSON, max_size=4) | _JSON)


@FUZZ
@given(weight_map=_WEIGHT_MAP, raw=st.none() | st.binary(max_size=12))
def test_fuzzed_indexes(tmp_path_factory, weight_map, raw):
    tmp = tmp_path_factory.mktemp("idx")
    src = _base(tmp / "src")
    text = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    (src / C.SAFE_INDEX).write_bytes(text)
    _outcome(tmp, src)


# --- config.json ---------------------------------------------------------------------------------------------------
_CONFIG = st.fixed_dictionaries({}, optional={"model_type": _JSON, "architectures": _JSON,
                                              "quantization_config": _JSON, "hidden_size": _JSON}) | _JSON


@FUZZ
@given(config=_CONFIG, raw=st.none() | st.binary(max_size=12))
def test_fuzzed_configs(tmp_path_factory, config, raw):
    tmp = tmp_path_factory.mktemp("cfg")
    src = _base(tmp / "src")
    (src / C.CONFIG_FILE).write_bytes(raw if raw is not None else json.dumps(config).encode())
    _outcome(tmp, src)


# --- recipes -------------------------------------------------------------------------------------------------------
_KEYS = ["method", "b0", "b1", "b2", "quantizer", "group_size", "rank", "rank_fraction", "rho", "energy",
         "bits_per_param", "svd", "sketch", "pattern", "layers", "types", "match", "nonsense"]
_VALUE = st.sampled_from(["rtn", "lplr", "lsvd", "dsvd", "laser", "copy", "group", "tensor", "exact", "up_proj",
                          "(", "mlp", "0-1", 4, 8, 16, 0.5, 1, 2, -1]) | _JSON
_RULE = st.dictionaries(st.sampled_from(_KEYS), _VALUE, max_size=4) | _JSON
_RECIPE = st.fixed_dictionaries({}, optional={"defaults": st.dictionaries(st.sampled_from(_KEYS), _VALUE, max_size=3)
                                              | _JSON, "rules": st.lists(_RULE, max_size=3) | _JSON}) | _JSON


@FUZZ
@given(recipe=_RECIPE, as_json=st.booleans(), raw=st.none() | st.binary(max_size=12))
def test_fuzzed_recipes(tmp_path_factory, recipe, as_json, raw):
    tmp = tmp_path_factory.mktemp("recipe")
    src = _base(tmp / "src")
    path = tmp / ("recipe.json" if as_json else "recipe.yaml")
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(recipe) if as_json else yaml.safe_dump(recipe))
    _outcome(tmp, src, recipe=path)
