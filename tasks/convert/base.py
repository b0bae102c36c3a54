"""The converter interface and the registry of source formats.

A converter turns one kind of source (a file, folder or URI) into an ONNX file and gives back a
runner of the source framework on the same inputs, so the conversion can be verified numerically
and the source's latency measured later. Converters register themselves by ``format`` when their
module is imported; heavy frameworks are imported inside the methods only.
"""

from __future__ import annotations

import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.core.text import human_bytes

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

CONVERTERS: dict[str, type[Converter]] = {}


class SourceRunner(Protocol):
    """Runs the source model in its own framework; outputs keyed by the ONNX output names."""

    name: str

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


SERVED = "served"  # the path a production service runs (graph function, inference_mode, ...)
EAGER = "eager"  # the framework's eager call, where it differs from the served path


@dataclass(frozen=True)
class SourcePath:
    """One way of running the source model for timing.

    ``kind`` is :data:`SERVED` or :data:`EAGER`; ``description`` says what runs, in words that go
    into the report and the version's ``bladeflow.baseline`` tag.
    """

    kind: str
    description: str
    call: Callable[[dict[str, np.ndarray]], Any]


def timing_paths(runner: SourceRunner, threads: int | None = None) -> list[SourcePath]:
    """The ways to time ``runner``: the served path first, then the eager one where it differs.

    A runner whose framework has a served path distinct from its reference call (Keras: a traced
    ``tf.function`` next to ``model(x)``) or thread settings (PyTorch) defines
    ``timing_paths(threads)``; any other runner is timed as it computes the reference. ``threads``
    is the intra-op thread count the ONNX candidates run with, for frameworks that can match it.
    """
    own = getattr(runner, "timing_paths", None)
    if callable(own):
        return list(own(threads))
    return [SourcePath(SERVED, runner.name, runner)]


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

    @classmethod
    def precheck(cls, source: str) -> None:
        """Cheap checks that need no framework (run by the CLI before anything starts, and by
        ``convert_source``): the size limit; formats add checks of their file structure.

        Raises:
            ModelFileError: the source is over the size limit, truncated or not of this format.
        """
        check_size(source)


ENV_MAX_MODEL_BYTES = "BLADEFLOW_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL_BYTES = 16 << 30  # 16 GiB: bladeflow loads the whole source into memory


def max_model_bytes() -> int:
    """The largest model source (file, or all files of a folder) bladeflow opens.

    ``BLADEFLOW_MAX_MODEL_BYTES`` overrides the default of 16 GiB: sources are loaded into memory
    (by their framework, then as ONNX), so a bigger one would exhaust it instead of failing.
    """
    raw = os.environ.get(ENV_MAX_MODEL_BYTES, "")
    try:
        return int(raw) if raw.strip() else DEFAULT_MAX_MODEL_BYTES
    except ValueError:
        raise ModelFileError(
            f"{ENV_MAX_MODEL_BYTES}={raw!r} is not a number of bytes (e.g. 17179869184)"
        ) from None


def source_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def check_size(source: str) -> None:
    """Refuse a local source over :func:`max_model_bytes` before anything reads it."""
    path = Path(source)
    if not path.exists():
        return  # URIs, and missing files (reported by the converter with a better message)
    size, limit = source_size(path), max_model_bytes()
    if size > limit:
        raise ModelFileError(
            f"{source} is {human_bytes(size)}, over bladeflow's limit of "
            f"{human_bytes(limit)} for a model source (it is loaded into memory). If this "
            f"machine has the memory, raise the limit: {ENV_MAX_MODEL_BYTES}=<bytes>."
        )


def check_zip(path: Path, what: str, how_to_save: str) -> list[str]:
    """The member names of a zip-based model file; ModelFileError when it is not a whole zip
    (a truncated copy loses the central directory at the end)."""
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes): the save or copy did not finish")
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path} is not a readable {what} ({exc}): a {what} is a zip archive and this one is "
            f"truncated or corrupt, or not a {what} at all. {how_to_save}"
        ) from exc


def load_converters() -> dict[str, type[Converter]]:
    """Import every built-in converter module (light: frameworks load lazily) and return them."""
    from bladeflow.tasks.convert import (  # noqa: F401
        caffe_source,
        hf_source,
        keras_source,
        mlflow_source,
        onnx_source,
        seq2seq_source,
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
