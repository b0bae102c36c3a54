"""Errors of the convert stage."""

from __future__ import annotations

from bladeflow.core.errors import ModelFileError, UserInputError


class ConversionError(UserInputError):
    """The source was read but could not be turned into a faithful ONNX model. Exit code 2."""


def missing_framework(
    fmt: str, package: str, extra: str | None, exc: BaseException
) -> ModelFileError:
    """The error for a source whose framework is not installed."""
    how = f"pip install 'bladeflow[{extra}]'" if extra else f"pip install {package}"
    return ModelFileError(
        f"converting a {fmt} model needs {package}, which is not installed ({exc}). "
        f"Install it with: {how}"
    )
