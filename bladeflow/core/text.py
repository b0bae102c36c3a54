"""Small formatting helpers every layer shares (sizes in messages, names in file paths)."""

from __future__ import annotations

from pathlib import Path


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; 17179869184 -> '16.0 GiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def safe_name(name: str) -> str:
    """``name`` usable as a file name: letters, digits, ``-_.``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# Real English sentences, one a line (from the Python standard library's documentation): the
# demo's sentence pairs, and the validation data of a text model run without --data.
BUILTIN_SENTENCES = Path(__file__).parent / "data" / "sentences.txt"


def builtin_sentences() -> list[str]:
    """The non-empty lines of ``BUILTIN_SENTENCES``, in file order."""
    text = BUILTIN_SENTENCES.read_text("utf-8")
    return [s for s in (line.strip() for line in text.splitlines()) if s]
