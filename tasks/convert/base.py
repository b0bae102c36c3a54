"""The converter interface and the registry of source formats.

A converter turns one kind of source (a file, folder or URI) into an ONNX file and gives back a
runner of the source framework on the same inputs, so the conversion can be verified numerically
and the source's latency measured later. Converters register themselves by ``format`` when their
module is imported; heavy frameworks are imported inside the methods only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from bladeflow.contract import ModelArtifact
from bladeflow.errors import ModelFileError

if TYPE_CHECKING:
    from tasks.convert.dispatch import ConvertOptions

CONVERTERS: dict[str, type[Converter]] = {}


class SourceRunner(Protocol):
    """Runs the source model in its own framework; outputs keyed by the ONNX output names."""

    name: str

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class Export:
    """What a converter produced: an ONNX file plus what verification and the artifact need."""

    onnx_path: Path
    runner: SourceRunner | None
    config: dict[str, Any] = field(default_factory=dict)
    value_ranges: dict[str, list[float]] = field(default_factory=dict)
    assets: dict[str, Path] = field(default_factory=dict)
    hashed: Path | None = None  # the file/folder whose sha256 is the parent's (default: source)


class Converter(ABC):
    """Turns one kind of model source into ONNX. Subclasses set ``format`` and ``description``."""

    format: ClassVar[str]
    description: ClassVar[str]
    order: ClassVar[int] = 50  # detection order: lower claims first

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "format", None):
            if cls.format in CONVERTERS and CONVERTERS[cls.format] is not cls:
                raise TypeError(f"two converters are named {cls.format!r}")
            CONVERTERS[cls.format] = cls

    @classmethod
    @abstractmethod
    def claims(cls, source: str) -> bool:
        """Whether ``source`` (a path or URI) looks like this format."""

    @abstractmethod
    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        """Write ``workdir/exported.onnx`` from ``source`` and return it with a source runner."""

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        """A runner of the source model in its framework (None when the source is ONNX)."""
        return None


def load_converters() -> dict[str, type[Converter]]:
    """Import every built-in converter module (light: frameworks load lazily) and return them."""
    from tasks.convert import (  # noqa: F401
        caffe_source,
        hf_source,
        keras_source,
        mlflow_source,
        onnx_source,
        sklearn_source,
        tf_source,
        torch_callable_source,
        torch_export_source,
        torchscript_source,
    )

    return CONVERTERS


def get_converter(fmt: str) -> Converter:
    converters = load_converters()
    try:
        return converters[fmt]()
    except KeyError:
        raise ModelFileError(f"unknown format {fmt!r}; supported: {supported_text()}") from None


def supported_text() -> str:
    return "; ".join(
        f"{k}: {c.description}" for k, c in sorted(load_converters().items(), key=_order)
    )


def _order(item: tuple[str, type[Converter]]) -> tuple[int, str]:
    return item[1].order, item[0]


def detect_converter(source: str) -> str | None:
    """The format key of the first converter that claims ``source``."""
    for key, cls in sorted(load_converters().items(), key=_order):
        if cls.claims(source):
            return key
    return None
