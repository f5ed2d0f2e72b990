"""The model card (README.md) that a push uploads: metadata for the Hub plus an honest account of the conversion."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from .. import constants as C
from ..io.manifest import Manifest, read_manifest

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

__all__ = ["base_model_of", "build_model_card"]

# Metadata of the source's own card that still holds for the converted model (its license above all).
_INHERITED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "datasets")
_REPO = r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"
# huggingface_hub's cache layout: .../models--OWNER--NAME/snapshots/<commit>/
_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
# A card's usage code loading the model it describes: SentenceTransformer("o/n"), X.from_pretrained("o/n"),
# pipeline(..., model="o/n").
_SELF_LOAD = re.compile(rf"""(?:SentenceTransformer|from_pretrained|model\s*=)\s*\(?\s*["']({_REPO})["']""")


def base_model_of(root: str | os.PathLike, repo_id: str | None = None) -> tuple[str | None, str | None]:
    """(Hub repo id of the model in `root`, where it was found) or (None, None).

    In order: `repo_id` (the source was downloaded from the Hub), the huggingface_hub cache path of a snapshot, the
    repo id that the source's own README.md loads in its usage code (the most frequent one). Deliberately not used:
    the card's `base_model` metadata and config.json's `_name_or_path`, which name the model the source was trained
    from (all-MiniLM-L6-v2's config says nreimers/MiniLM-L6-H384-uncased), not the source itself.
    """
    if repo_id:
        return repo_id, "hub"
    root = Path(root)
    m = _CACHE_SNAPSHOT.search(root.resolve().as_posix() if root.exists() else root.as_posix())
    if m:
        return f"{m.group(1)}/{m.group(2)}", "hub cache path"
    readme = root / C.MODEL_CARD if root.is_dir() else None
    if readme is None or not readme.is_file():
        return None, None
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    found = Counter(_SELF_LOAD.findall(text))
    return (found.most_common(1)[0][0], "source README usage") if found else (None, None)


def build_model_card(out_dir: str | os.PathLike, repo_id: str | None = None,
                     base_model: str | None = None) -> ModelCard:
    """Build the model card of a converted directory from its manifest (and the source card copied into it, if any).

    `base_model` (a Hub repo id) overrides the one the manifest's source block records."""
    from huggingface_hub import ModelCard, ModelCardData

    out_dir = Path(out_dir)
    manifest = Manifest.from_json(read_manifest(out_dir))
    source = manifest.source
    base_model = base_model or _recorded_base(source)
    methods = sorted({t.method for t in manifest.tensors if t.method != "copy"})
    tags = [C.TOOL_NAME, "low-rank", "quantized", *methods]
    if source.get("model_type"):
        tags.append(source["model_type"])

    extra = {"base_model_relation": "quantized"} if base_model else {}
    data = ModelCardData(base_model=base_model, library_name=C.TOOL_NAME, tags=tags,
                         **_inherited_metadata(out_dir), **extra)
    body = _body(manifest, out_dir, repo_id, base_model)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _inherited_metadata(out_dir: Path) -> dict:
    """License, language, ... from the source's README.md copied into `out_dir` (empty when absent or unreadable)."""
    path = out_dir / C.MODEL_CARD
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        meta = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception as e:  # noqa: BLE001  (a malformed source card must not block a push; it just passes nothing on)
        logger.warning(f"ignoring the metadata of {path} ({type(e).__name__}: {e})")
        return {}
    return {k: meta[k] for k in _INHERITED_KEYS if meta.get(k) is not None}


def _recorded_base(source: dict) -> str | None:
    """The base model the manifest records (manifests written before it was recorded: the Hub repo id)."""
    return source.get("base_model") or source.get("repo_id")


def _body(manifest: Manifest, out_dir: Path, repo_id: str | None, base: str | None) -> str:
    from ..report import summary_markdown
    from ..report.metrics import summary_of

    source, options = manifest.source, manifest.options
    summary = summary_of(manifest)
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{Path(source.get('path') or '?').name}`"
    parts = [
        f"# {repo_id or out_dir.name}",
        (f"A compressed copy of {base_text} made with {C.TOOL_NAME} {manifest.tool_version}: "
        f"{summary['n_compressed']} of {summary['n_tensors']} tensors are stored as low-rank factors with "
        f"low-precision (bit-packed) entries or as quantized matrices; the rest are copied unchanged. Loading it "
        f"needs the `{C.TOOL_NAME}` package: `import lplr_convert` before `from_pretrained` (without it, "
        f"transformers stops on a missing file instead of loading random weights)."),
        "## Results",
        _results_text(summary),
        summary_markdown(manifest, summary).rstrip(),
    ]
    if (out_dir / C.PLOT_ERROR).is_file():  # the Hub renders images of the repo that a README links relatively
        parts.append(f"![relative error per layer and matrix type]({C.PLOT_ERROR})")
    if (out_dir / C.PLOT_OUTPUT_ERROR).is_file():
        parts.append(f"![output error on the calibration inputs per layer]({C.PLOT_OUTPUT_ERROR})")
    if not manifest.eval:
        parts.append("No model-level fidelity evaluation was recorded (run `lplr-convert eval --original SRC "
                     "--converted DST` before pushing to add one).")
    parts += ["## How it was made", "```bash\n" + str(options.get("command") or "(command not recorded)") + "\n```",
              _settings_text(options), _applied_text(summary)]
    parts += ["## How to load", _load_text(repo_id or "OWNER/NAME", (source.get("architectures") or [None])[0])]
    parts += ["## Files", _files_text(out_dir)]
    return "\n\n".join(p for p in parts if p)


def _results_text(s: dict) -> str:
    """The headline numbers in words, whatever they are."""
    bpp, src, err = s.get("bits_per_param"), s.get("source_bits_per_param"), s.get("weighted_rel_error")
    if bpp is None or err is None:
        return ""
    return (f"Overall {bpp:.2f} bits per parameter (the source: {src:.2f}); the parameter-weighted relative "
            f"Frobenius error of the compressed tensors is {err:.4f}, i.e. they differ from the originals by "
            f"{100 * err:.1f} % in norm.")


def _settings_text(options: dict) -> str:
    settings = options.get("settings") or {}
    items = [f"{k}={_short(v)}" for k, v in settings.items() if v is not None]
    for key in ("seed", "recipe", "include", "exclude", "layers", "types"):
        if options.get(key) is not None:
            items.append(f"{key}={_short(options[key])}")
    return ("Settings: " + ", ".join(f"`{i}`" for i in items) + ".") if items else ""


def _applied_text(summary: dict) -> str:
    """Each distinct method and settings the compressed tensors got (recipe rules included), as the report labels
    them: every knob a method declares shows here without an edit."""
    labels = summary.get("methods") or []
    return ("Applied to the compressed tensors: " + ", ".join(f"`{x}`" for x in labels) + ".") if labels else ""


def _load_text(repo_id: str, architecture: str | None) -> str:
    cls = architecture or "AutoModel"
    return (f"```bash\npip install {C.TOOL_NAME}\n```\n\n"
            "```python\n"
            f"import lplr_convert  # registers quant_method \"{C.QUANT_METHOD}\" with transformers\n"
            f"from transformers import {cls}\n\n"
            f'model = {cls}.from_pretrained("{repo_id}")  # runs from the stored bits (packed codes, scales)\n'
            "```\n\n"
            "The linear layers keep the stored codes in memory and compute from them (the model takes about its "
            "size on disk); on a CPU, 4-bit weights decode fastest with `dtype=torch.bfloat16`. "
            "For float layers instead pass "
            "`quantization_config=lplr_convert.hf.quantizer.LplrConvertConfig(dequantize=True)`.\n\n"
            "Or with the package's own loaders:\n\n"
            "```python\n"
            "from huggingface_hub import snapshot_download\n"
            "from lplr_convert import load_model, load_state_dict\n\n"
            f'path = snapshot_download("{repo_id}")\n'
            "model = load_model(path)            # packed linear layers computing from the stored bits\n"
            "floats = load_model(path, packed=False)  # float layers (low-rank factors kept factored)\n"
            "state_dict = load_state_dict(path)  # dense tensors with the original names and dtypes\n"
            "```")


def _files_text(out_dir: Path) -> str:
    lines = [(f"- `{C.MANIFEST_FILE}`: every tensor's method, rank, bit widths, stored size and relative error, "
              "the source files' sha256 and the exact settings.")]
    if (out_dir / C.REPORT_MD).is_file():
        lines.append(f"- `{C.REPORT_MD}` (and `.csv`/`.json`): the layer-wise error report.")
    plots = [p for p in (C.PLOT_ERROR, C.PLOT_OUTPUT_ERROR, C.PLOT_BITS, C.PLOT_SPECTRUM) if (out_dir / p).is_file()]
    if plots:
        lines.append("- Plots: " + ", ".join(f"`{p}`" for p in plots) + ".")
    lines.append(f"- `{C.CONFIG_FILE}` carries `quantization_config` with `quant_method: {C.QUANT_METHOD}`.")
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, dict) and set(value) == {"kind", "value"}:  # a rank policy
        value = f"{value['kind']}:{value['value']}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."
