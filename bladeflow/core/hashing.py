"""Content hashes for model files and folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20
_TREE_TAG = b"bladeflow-tree-v2\0"  # folders never hash like a file, nor like the unframed v1


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order).

    A file hashes to the plain sha256 of its bytes (what ``sha256sum`` prints). A folder hashes
    each file as one framed entry: the name's length (8 bytes, big-endian), the name, then the
    32-byte sha256 of the content. Every field has a known length, so two different trees can
    never produce the same byte stream (unframed, a name and a content could trade bytes across
    an entry boundary).
    """
    p = Path(path)
    if p.is_file():
        return _file_digest(p).hex()
    digest = hashlib.sha256(_TREE_TAG)
    for f in sorted(f for f in p.rglob("*") if f.is_file()):
        name = f.relative_to(p).as_posix().encode()
        digest.update(len(name).to_bytes(8, "big") + name + _file_digest(f))
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.digest()
