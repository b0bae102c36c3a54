"""Real short English sentences, gathered offline from the docstrings of the standard library."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

_DOCSTRING = re.compile(r'"""(.*?)"""', re.S)
_SENTENCE = re.compile(r"[A-Z][a-z][^.!?]{20,160}[.!?]")
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z ,;'()-]+[.!?]$")


def short_sentences(count: int = 300, min_words: int = 5, max_words: int = 20) -> list[str]:
    """``count`` distinct plain-English sentences (no code, no markup), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for doc in _DOCSTRING.findall(text):
            for raw in _SENTENCE.findall(" ".join(doc.split())):
                words = raw.split()
                if min_words <= len(words) <= max_words and _PLAIN.match(raw):
                    found.setdefault(raw, None)
        if len(found) >= count * 3:
            break
    sentences = list(found)
    # Spread the pick over all modules found rather than the first few files.
    step = max(len(sentences) // count, 1)
    picked = sentences[::step][:count]
    if len(picked) < count:
        raise RuntimeError(f"found only {len(picked)} sentences under {root}")
    return picked


def long_texts(sentences: list[str], count: int, words: int = 160) -> list[str]:
    """``count`` paragraphs of about ``words`` words (>128 tokens), made of the sentences."""
    out, i = [], 0
    for _ in range(count):
        para: list[str] = []
        while sum(len(s.split()) for s in para) < words:
            para.append(sentences[i % len(sentences)])
            i += 1
        out.append(" ".join(para))
    return out
