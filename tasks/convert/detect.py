"""Detect the format of a model source from its path, folder layout or URI."""

from __future__ import annotations

from pathlib import Path

from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import detect_converter, load_converters, supported_text

_PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib"}


def detect_format(source: str, fmt: str | None = None) -> str:
    """Return the format key of ``source`` (or check ``fmt`` when the user named it).

    Raises:
        ModelFileError: the source does not exist, or its kind is not one bladeflow converts.
    """
    if fmt:
        if fmt not in load_converters():
            raise ModelFileError(f"unknown --format {fmt!r}; supported formats: {supported_text()}")
        return fmt
    path = Path(source)
    if path.suffix.lower() in _PICKLE_SUFFIXES and path.exists():
        raise ModelFileError(
            f"{source} is a Python pickle: loading it runs arbitrary code, so bladeflow refuses "
            "it and no --format makes it load. For scikit-learn, save the model with skops "
            "(skops.io.dump(model, 'model.skops')) or log it with "
            "mlflow.sklearn.log_model(..., serialization_format='skops') and pass the models:/ "
            "URI; "
            "for PyTorch, save a TorchScript file or a torch.export .pt2."
        )
    found = detect_converter(source)
    if found:
        return found
    if ":" not in source and not path.exists():
        raise ModelFileError(f"model source {source!r} does not exist: check the path")
    raise ModelFileError(
        f"cannot tell what kind of model {source!r} is (suffix {path.suffix or 'none'!r}). "
        f"bladeflow converts {supported_text()}. Rename the file or pass --format."
    )
