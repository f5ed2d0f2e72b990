"""Tiny checkpoints with a character-level tokenizer (built once per session) and a calibration text."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_checkpoints import build_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(name) -> checkpoint directory (config, safetensors, tokenizer) of TINY[name]."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_tiny(name, tmp_path_factory.mktemp(f"calib_{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """40 lines of 6 to 16 words (lines differ in length, so encoder batches are padded)."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "owls", "count",
             "42", "stars", "and", "3", "moons"]
    lines = [" ".join(words[(i * 5 + k) % len(words)] for k in range(6 + i % 11)) + f" ({i})" for i in range(40)]
    path = tmp_path_factory.mktemp("calib_text") / "text.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
