"""verify vouches only for what it checked: every section of the manifest (digests), every file in the output (the
report's included; unlisted files are named, and push refuses them), the source's identity by sha256, every record's
parts decoded cheaply (`--full`: whole); older manifests still verify, with a note."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lplr_testing import error_line, run_cli
from safetensors.torch import load_file, save_file

from lplr_convert import constants as C
from lplr_convert.errors import LplrError
from lplr_convert.io.manifest import integrity_hash, section_digests
from lplr_convert.verify import verify


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_llama_dir):
    """A tiny Llama converted with lplr and its report (plots included when matplotlib is there)."""
    out = tmp_path_factory.mktemp("verify_covers") / "out"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--method", "lplr")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def out(made, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(made, copy)
    return copy


def _doc(out: Path) -> dict:
    return json.loads((out / C.MANIFEST_FILE).read_text())


def _write(out: Path, doc: dict, rehash: bool = False) -> None:
    """Write a manifest back; `rehash`: as a careful forger would (integrity and digests recomputed)."""
    doc[C.M_INTEGRITY] = integrity_hash(doc)
    if rehash and C.M_DIGESTS in doc:
        doc[C.M_DIGESTS] = section_digests(doc)
    (out / C.MANIFEST_FILE).write_text(json.dumps(doc, indent=2))


def test_a_fresh_output_verifies_whole_and_lists_its_report(out):
    doc = _doc(out)
    assert C.REPORT_MD in doc[C.M_REPORT] and C.REPORT_JSON in doc[C.M_REPORT]
    assert set(doc[C.M_DIGESTS]) == set(doc) - {C.M_DIGESTS}
    result = verify(out, full=True)
    assert result["notes"] == [] and result["decoded"] == "full"
    res = run_cli("verify", "--in-path", str(out), "--full")
    assert res.exit_code == 0 and res.output.startswith("ok:"), res.output


@pytest.mark.parametrize("section,change", [
    ("source", lambda s: s.update(model_type="gpt2")),
    ("summary", lambda s: s.update(bits_per_param=1.0)),
    ("options", lambda s: s.update(seed=7)),
    ("format_version", None),
])
def test_a_changed_section_of_the_manifest_is_named(out, section, change):
    doc = _doc(out)
    if change is None:
        doc[section] = doc[section] + "1"
    else:
        change(doc[section])
    _write(out, doc)  # integrity (tensors + shards) still matches: loaders accept it
    with pytest.raises(LplrError, match=f"'{section}' section was modified"):
        verify(out)
    assert error_line(run_cli("verify", "--in-path", str(out)), "verify failed", section)


@pytest.mark.parametrize("name", [C.REPORT_MD, C.REPORT_CSV, C.REPORT_JSON])
def test_a_changed_report_file_is_named(out, name):
    with open(out / name, "ab") as f:
        f.write(b"x")
    with pytest.raises(LplrError, match=f"{name} does not match its sha256"):
        verify(out)


def test_an_unlisted_model_file_is_named_and_never_pushed(out, tiny_llama_dir, tmp_path):
    shutil.copy(next(tiny_llama_dir.glob("*.safetensors")), out / "model.safetensors")  # another model's weights
    with pytest.raises(LplrError, match="model.safetensors is in the output but lplr_manifest.json does not list it"):
        verify(out)
    res = run_cli("push", "--in-path", str(out), "--repo-id", "me/x", "--dry-run")
    error_line(res, "model.safetensors", "not a file of the conversion")


def test_a_report_rewritten_by_the_report_command_is_listed_again(out):
    (out / C.REPORT_MD).unlink()
    with pytest.raises(LplrError, match=f"{C.REPORT_MD} is missing"):
        verify(out)
    assert run_cli("report", "--in-path", str(out)).exit_code == 0
    verify(out)


def test_source_identity_is_checked_by_sha256(out, tiny_llama_dir, tmp_path):
    verify(out, source=str(tiny_llama_dir))
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    shard = next(p for p in sorted(other.glob("*.safetensors")) if "model.norm.weight" in load_file(str(p)))
    tensors = load_file(str(shard))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2  # a copied tensor: no error sample sees it
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(LplrError, match=f"is not the checkpoint .* its {shard.name} differs"):
        verify(out, source=str(other))


def _records(out: Path, edit) -> None:
    doc = _doc(out)
    rec = next(t for t in doc[C.M_TENSORS] if t["method"] == "lplr")
    edit(rec)
    _write(out, doc, rehash=True)


@pytest.mark.parametrize("edit,needle", [
    (lambda r: r["info"]["left"].update(bits=9), "quantizer spec of lplr_left is invalid"),
    (lambda r: r["info"].update(left={"shape": [4, 4]}), "invalid quantizer spec"),
    (lambda r: r["info"]["right"].update(shape=[3, 5]), "do not make a"),
    (lambda r: r["info"]["left"].update(granularity="group", group_size=2, channel_dim=0), "stores"),
    (lambda r: r.update(info=[1]), "malformed record"),
    (lambda r: r.update(stored={}), "stores no tensor"),
    (lambda r: r.update(method="nosuch"), "nosuch"),
])
def test_records_no_loader_can_decode_are_named_even_when_rehashed(out, edit, needle):
    _records(out, edit)
    with pytest.raises(LplrError, match="no loader can decode it") as e:
        verify(out)
    assert needle in str(e.value)


def test_stored_nothing_is_refused_by_the_loaders(out):
    import lplr_convert  # noqa: F401
    from transformers import AutoModelForCausalLM

    from lplr_convert import load_model

    _records(out, lambda r: r.update(stored={}))
    with pytest.raises(LplrError, match="stores no tensor"):
        load_model(out)
    with pytest.raises(LplrError, match="stores no tensor"):
        AutoModelForCausalLM.from_pretrained(str(out))


def test_padding_bits_and_nonfinite_scales_are_found_without_a_dense_decode(out):
    doc = _doc(out)
    rec = next(t for t in doc[C.M_TENSORS] if t["method"] == "lplr")
    scale = f"{rec['name']}.{C.PART_LEFT}.{C.FIELD_SCALE}"
    shard = out / rec["shard"]
    tensors = load_file(str(shard))
    tensors[scale] = tensors[scale].clone()
    tensors[scale].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata={C.META_FORMAT_KEY: C.META_FORMAT_VALUE})
    doc[C.M_SHARDS][rec["shard"]] = {"sha256": __import__("hashlib").sha256(shard.read_bytes()).hexdigest(),
                                     "bytes": shard.stat().st_size}
    _write(out, doc, rehash=True)
    with pytest.raises(LplrError, match="non-finite values in"):
        verify(out)


def test_an_older_manifest_verifies_with_a_note(out):
    doc = _doc(out)
    del doc[C.M_DIGESTS], doc[C.M_REPORT]
    _write(out, doc)
    result = verify(out)
    assert any("predates per-section digests" in n for n in result["notes"])
    assert any("predates listing the report" in n for n in result["notes"])


@pytest.mark.parametrize("kind", ["link", "dir"])
def test_a_shard_that_is_a_link_or_a_directory_is_named_as_such(out, tmp_path, kind):
    shard = next(iter(_doc(out)[C.M_SHARDS]))
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(out / shard, moved)
    if kind == "link":
        (out / shard).symlink_to(moved)
    else:
        (out / shard).mkdir()
    with pytest.raises(LplrError, match="is a symbolic link" if kind == "link" else "is a directory"):
        verify(out)


@pytest.mark.parametrize("which", ["shard", C.CONFIG_FILE, C.SAFE_INDEX])
def test_no_loader_follows_a_link_out_of_the_output(out, tmp_path, which):
    import lplr_convert  # noqa: F401
    from transformers import AutoModelForCausalLM

    from lplr_convert import load_model
    from lplr_convert.export.dense import decompress

    rel = next(iter(_doc(out)[C.M_SHARDS])) if which == "shard" else which
    moved = tmp_path / "elsewhere" / rel
    moved.parent.mkdir()
    shutil.move(out / rel, moved)
    (out / rel).symlink_to(moved)
    loaders = [lambda: load_model(out), lambda: verify(out), lambda: AutoModelForCausalLM.from_pretrained(str(out))]
    if which != C.SAFE_INDEX:  # decompress never reads the index (it writes its own)
        loaders.append(lambda: decompress(out, tmp_path / "dense"))
    for load in loaders:
        with pytest.raises(LplrError, match="symbolic link .* out of the output"):
            load()
    (out / rel).unlink()
    inside = out / "inside"
    inside.mkdir()
    shutil.move(moved, inside / rel)
    (out / rel).symlink_to(Path("inside") / rel)  # a link within the output is read (Hub snapshots link to blobs)
    load_model(out)


@pytest.mark.parametrize("edit", [lambda r: r["info"]["left"].update(bits=9),
                                  lambda r: r["info"]["right"].update(shape=[3, 5])])
def test_loaders_name_an_undecodable_record_in_one_line(out, edit):
    import lplr_convert  # noqa: F401
    from transformers import AutoModelForCausalLM

    from lplr_convert import load_model

    _records(out, edit)
    for load in (lambda: load_model(out), lambda: AutoModelForCausalLM.from_pretrained(str(out)),
                 lambda: load_model(out, factored=False)):
        with pytest.raises(LplrError, match="the output is damaged"):
            load()


def test_a_deeply_nested_manifest_is_a_one_line_error(out):
    (out / C.MANIFEST_FILE).write_text('{"format_version": "1.0", "x": ' + "[" * 100000 + "]" * 100000 + "}")
    error_line(run_cli("verify", "--in-path", str(out)), "nested too deeply")
