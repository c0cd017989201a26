"""A small byte-pair vocabulary for the demo model's text tower, in the format of open_clip's SimpleTokenizer.

With open_clip's 49,408-token vocabulary the demo model's token embedding would hold most of its
checkpoint's weights (all with zero task vectors), which distorts every global top-k of the image
tower (TIES, magnitude masking). Merges learned on the demo's own words keep the text-only weights to a
share of the checkpoint close to that of the paper's ViT-B-32 (about a fifth). Any other text still
tokenizes, byte by byte.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = 2  # <start_of_text>, <end_of_text>
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct words of ``texts`` as open_clip's SimpleTokenizer splits them (lower-cased), sorted."""
    return sorted({w for text in texts for w in _WORD.findall(" ".join(text.lower().split()))})


def learn_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, in rank order, until every one of ``words`` is a single token (ties: the smallest pair)."""
    from open_clip.tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    pieces: dict[str, list[str]] = {}
    for word in sorted(set(words)):
        chars = [byte_char[b] for b in word.encode("utf-8")]
        pieces[word] = chars[:-1] + [chars[-1] + "</w>"]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for parts in pieces.values() for pair in zip(parts, parts[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, parts in pieces.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged


def vocabulary_size(merges: list[tuple[str, str]]) -> int:
    """Token count of a SimpleTokenizer with these merges: 256 bytes, 256 word-final bytes, merges, specials."""
    return 512 + len(merges) + SPECIAL_TOKENS


def write_bpe(path: str | Path, merges: list[tuple[str, str]]) -> Path:
    """Save merges as SimpleTokenizer reads them (gzip, a header line, one merge a line, no trailing newline)."""
    text = "\n".join(["#version: tallmasks-demo", *(f"{a} {b}" for a, b in merges)])
    path = Path(path)
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(text.encode("utf-8"))
    return path


def read_bpe(path: str | Path) -> list[tuple[str, str]]:
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1:]
    return [tuple(line.split()) for line in lines]  # type: ignore[misc]
