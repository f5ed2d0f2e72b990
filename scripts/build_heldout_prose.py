"""Rebuild scripts/data/heldout_prose.txt, the held-out English prose of the decoder-LLM quality benchmark.

Source: "Workshop on Electronic Texts: Proceedings", edited by James Daly, Library of Congress, 9-10 June 1992 (a
work of the United States Government, hence public domain in the US; released by Project Gutenberg as "LOC WORKSHOP
ON ELECTRONIC TEXTS"), as kept in the Canterbury corpus (`lcet10.txt`), taken from the brotli 1.2.1 source
distribution on PyPI (`tests/testdata/lcet10.txt`):

    pip download --no-deps --no-binary :all: -d DIR brotli==1.2.1
    python scripts/build_heldout_prose.py DIR/brotli-1.2.1.tar.gz

It is none of the five works in the shipped calibration text (lplr_convert/data/CALIBRATION_SOURCES.md) and not the
project's own sentences. Kept: the prose from the INTRODUCTION on, wrapped lines joined into one paragraph a line;
dropped: the Project Gutenberg header and end note, the table of contents, headings, separators and the list of
contacts (paragraphs under 200 characters).
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "heldout_prose.txt"


def main(tar: str) -> None:
    with tarfile.open(tar) as t:
        name = next(n for n in t.getnames() if n.endswith("tests/testdata/lcet10.txt"))
        text = t.extractfile(name).read().decode("latin-1").replace("\r\n", "\n")
    text = text[text.index("INTRODUCTION"):text.rindex("*End of The Project Gutenberg")]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    keep = [p for p in paragraphs if len(p) >= 200 and "***" not in p]
    OUT.write_text("\n".join(keep) + "\n", encoding="utf-8")
    print(f"{len(keep)} paragraphs, {sum(map(len, keep))} characters -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
