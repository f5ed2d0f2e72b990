"""Calibration text: file formats, the bundled default, packing, and one-line errors for unusable input."""

from __future__ import annotations

import pytest

from lplr_convert.calibration.text import DEFAULT_TEXT, load_tokenizer, make_batches, read_text, tokenize
from lplr_convert.errors import LplrError


def test_bundled_text_is_large_varied_and_disjoint_from_the_eval_sentences():
    text = read_text()
    assert text.source == "lplr_convert/data/calibration_text.txt" and len(text.lines) >= 500
    assert len(set(text.lines)) == len(text.lines)
    evals = set(read_text(DEFAULT_TEXT.parent / "eval_sentences.txt").lines)
    assert not evals & set(text.lines)
    lengths = sorted(len(s.split()) for s in text.lines)
    assert lengths[0] <= 6 and lengths[-1] >= 60  # short and long lines
    assert sum(any(ch.isdigit() for ch in s) for s in text.lines) >= 50


def test_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n  \nsecond\n", encoding="utf-8")
    assert read_text(tmp_path / "a.jsonl").lines == read_text(tmp_path / "a.txt").lines == ["first", "second"]


@pytest.mark.parametrize("content,suffix,words", [
    ("", ".txt", "no usable line"), ("\n \n", ".txt", "no usable line"), ('{"body": "x"}\n', ".jsonl", "'text'"),
    ("not json\n", ".jsonl", "not valid JSON"), ('{"text": 3}\n', ".jsonl", "'text'")])
def test_bad_text_is_one_line_error(tmp_path, content, suffix, words):
    path = tmp_path / f"t{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LplrError, match=words) as e:
        read_text(path)
    assert "\n" not in str(e.value)


def test_missing_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(LplrError, match="no tokenizer files.*copy the model's tokenizer files"):
        load_tokenizer(tmp_path)


def test_causal_chunks_and_encoder_lines(tiny_dir, text_file):
    tok = load_tokenizer(tiny_dir("llama"))
    lines = read_text(text_file).lines
    chunks = tokenize(tok, lines, True, 5, 32)
    assert [len(c) for c in chunks] == [32] * 5
    assert tok.eos_token_id is None and tok.bos_token_id is None  # so SEP separates the lines, nothing leads
    stream = [t for line in lines for t in tok(line, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    assert [t for c in chunks for t in c] == stream[:160]  # consecutive pieces of one stream, nothing lost or repeated
    rows = tokenize(tok, lines, False, 3, 12)
    assert rows == [tok(s, truncation=True, max_length=12)["input_ids"] for s in lines[:3]]
    batch = make_batches(rows, 3, tok.pad_token_id)[0]
    assert batch.tokens == sum(map(len, rows)) and batch.input_ids.shape == (3, max(map(len, rows)))


def test_the_default_for_causal_lms_meets_the_defaults_in_full(minilm_dir):
    """Encoders keep the bundled sentences; causal LMs get them followed by the public-domain books, at least 256k
    tokens (here MiniLM's WordPiece; SmolLM2's BPE gives more), so 128 samples of 512 tokens come in full. The books
    carry no Project Gutenberg header or trademark and share no 8-word sequence with the evaluation texts."""
    import re

    from lplr_convert.calibration.text import DEFAULT_BOOKS, default_text

    sentences, text = read_text(), default_text(causal=True)
    assert default_text(causal=False) == sentences
    assert list(text.lines[:len(sentences.lines)]) == sentences.lines and text.sha256 != sentences.sha256
    books = read_text(DEFAULT_BOOKS).lines
    assert text.lines[len(sentences.lines):] == books and len(books) >= 300
    assert text.source == "lplr_convert/data/calibration_text.txt + lplr_convert/data/calibration_books.jsonl.gz"
    tok = load_tokenizer(minilm_dir)
    assert sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in text.lines) >= 256_000
    chunks = tokenize(tok, text.lines, True, 128, 512)
    assert [len(c) for c in chunks] == [512] * 128
    joined = "\n".join(books)
    assert "gutenberg" not in joined.lower() and all(8 <= len(b) <= 6000 for b in books)

    def grams(t: str) -> set:
        w = re.findall(r"[a-z0-9']+", t.lower())
        return {tuple(w[i:i + 8]) for i in range(len(w) - 7)}

    heldout = DEFAULT_TEXT.parent.parent.parent / "scripts" / "data" / "heldout_sentences.txt"
    evals = [DEFAULT_TEXT.parent / "eval_sentences.txt", DEFAULT_TEXT] + ([heldout] if heldout.is_file() else [])
    book_grams = grams(joined)
    for path in evals:
        assert not grams(path.read_text(encoding="utf-8")) & book_grams, path
