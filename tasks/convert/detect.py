"""Detect the format of a model source from its path."""

from __future__ import annotations

from pathlib import Path

from bladeflow.errors import ModelFileError

SUPPORTED = {"onnx": "an ONNX model file (.onnx)"}


def detect_format(source: str, fmt: str | None = None) -> str:
    """Return the format key of ``source`` (or check ``fmt`` when the user named it).

    Raises:
        ModelFileError: the file does not exist, or its kind is not one bladeflow converts.
    """
    if fmt:
        if fmt not in SUPPORTED:
            raise ModelFileError(
                f"unknown --format {fmt!r}; supported formats: {', '.join(SUPPORTED)}"
            )
        return fmt
    path = Path(source)
    if not path.exists():
        raise ModelFileError(f"model source {source!r} does not exist: check the path")
    if path.is_file() and path.suffix.lower() == ".onnx":
        return "onnx"
    kinds = "; ".join(f"{k}: {v}" for k, v in SUPPORTED.items())
    raise ModelFileError(
        f"cannot tell what kind of model {source!r} is (suffix {path.suffix or 'none'!r}). "
        f"bladeflow converts {kinds}. Rename the file or pass --format."
    )
