"""One registered model version, loaded: download, ONNX Runtime session, warm-up, predict.

Model files come only from the registry (the version's artifacts); nothing is unpickled and no
path from a request is ever used.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bladeflow.core import registry
from bladeflow.core.contract import SessionConfig
from bladeflow.serving.codec import ORT_STRING, ORT_TO_NUMPY, DecodeError, InputMeta

log = logging.getLogger("bladeflow.serving")


class LoadError(Exception):
    """A version could not be downloaded, loaded or warmed up; the old version keeps serving."""


@dataclass(frozen=True)
class ServeOptions:
    """How every model is run; set by ``bladeflow serve`` flags."""

    max_batch_size: int = 32
    batch_timeout_ms: float = 2.0
    max_queue_size: int = 256
    workers: int = 1
    intra_op_threads: int = 0  # 0: the recipe's setting
    request_timeout_s: float = 30.0
    shadow_share: float = 0.0  # share of champion requests also run on the canary, 0..1
    shadow_atol: float = 1e-4
    shadow_rtol: float = 1e-3


class LoadedVersion:
    """An ONNX Runtime session for one model version plus what the request path needs."""

    def __init__(self, name: str, version: str, folder: Path, session_config: SessionConfig):
        from bladeflow.core.runtime import make_session

        self.name = name
        self.version = version
        self.session_config = session_config
        model_file = _model_file(folder)
        self.session = make_session(model_file, session_config)
        self.inputs: dict[str, InputMeta] = {}
        for i in self.session.get_inputs():
            dtype = ORT_TO_NUMPY.get(i.type)
            if dtype is None:
                raise LoadError(f"input {i.name!r} has type {i.type}, which serving cannot decode")
            self.inputs[i.name] = InputMeta(i.name, dtype, tuple(_dims(i.shape)))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_shapes = {o.name: tuple(_dims(o.shape)) for o in self.session.get_outputs()}
        # String outputs (a classifier's labels) come back as numpy object arrays: v2 BYTES.
        strings = {ORT_STRING: "object"}
        self.output_types = {
            o.name: ORT_TO_NUMPY.get(o.type, strings.get(o.type, o.type))
            for o in self.session.get_outputs()
        }
        self.tokenizer_dir = _tokenizer_dir(folder)
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (merged) batch; called in a worker thread."""
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))

    def example(self, rows: int = 1, length: int = 8) -> dict[str, np.ndarray]:
        """Inputs of the right dtypes/shapes (dynamic dims -> ``length``), for warm-up."""
        feeds = {}
        for name, meta in self.inputs.items():
            shape = [rows] + [d if isinstance(d, int) else length for d in meta.shape[1:]]
            fill = 1 if name == "attention_mask" else 0
            feeds[name] = np.full(shape, fill, dtype=meta.dtype)
        return feeds

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the model once per batch size, so the first real request is not slow."""
        for rows in batch_sizes:
            self.predict(self.example(rows))
        if self.tokenizer_dir is not None:
            self.tokenize(["warm up"])

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Raw text -> model inputs with the version's own tokenizer (transformers, lazily)."""
        if self.tokenizer_dir is None:
            raise DecodeError(
                f"version {self.version} of {self.name!r} has no tokenizer: send tensors"
            )
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.tokenizer_dir), local_files_only=True
                )
            enc = self._tokenizer(texts, padding=True, truncation=True, return_tensors="np")
        feeds = {}
        for name, meta in self.inputs.items():
            if name not in enc:
                raise DecodeError(f"the tokenizer does not produce the model input {name!r}")
            feeds[name] = np.asarray(enc[name], dtype=meta.dtype)
        return feeds

    def describe(self) -> dict[str, Any]:
        return {
            "inputs": [m.describe() for m in self.inputs.values()],
            "outputs": [
                InputMeta(n, str(self.output_types[n]), self.output_shapes[n]).describe()
                for n in self.output_names
            ],
        }


def load_version(
    client: Any, name: str, version: str, workdir: Path, options: ServeOptions
) -> LoadedVersion:
    """Download ``name``/``version`` from the registry, build its session and warm it up.

    Raises:
        LoadError: with the reason (download, ONNX Runtime load or warm-up failure).
    """
    import mlflow.artifacts

    start = time.perf_counter()
    folder = workdir / f"{name}-v{version}-{time.monotonic_ns()}"
    try:
        mv = client.get_model_version(name, version)
        # The registry URI was set process-wide by the server (mlflow.set_registry_uri).
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(folder)
        )
        config = session_config(mv.tags, options, runtime_file_config(folder))
        if is_generation_folder(folder):  # an encoder-decoder: a decoder loop, text in and out
            from bladeflow.serving.generation import GenerationVersion

            loaded: LoadedVersion = GenerationVersion(name, version, folder, config)
        else:
            loaded = LoadedVersion(name, version, folder, config)
        sizes = tuple(sorted({1, max(1, options.max_batch_size)}))
        loaded.warm_up(sizes)
    except Exception as exc:  # any failure: not served; logged, counted, shown in status
        shutil.rmtree(folder, ignore_errors=True)
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        raise LoadError(f"{name} version {version}: {reason}") from exc
    log.info("loaded %s version %s in %.1f s", name, version, time.perf_counter() - start)
    return loaded


def session_config(
    tags: dict[str, str], options: ServeOptions, fallback: SessionConfig | None = None
) -> SessionConfig:
    """The recipe's runtime config, with spinning off (serving shares cores with its own I/O).

    The ``bladeflow.recipe`` tag wins; ``fallback`` (the logged ``bladeflow_runtime.json``) is
    used for versions registered without it.
    """
    recipe = tags.get(registry.TAG_RECIPE)
    config = registry.session_from_recipe(recipe) if recipe else (fallback or SessionConfig())
    update: dict[str, Any] = {"allow_spinning": False}
    if options.intra_op_threads > 0:
        update["intra_op_num_threads"] = options.intra_op_threads
    return config.model_copy(update=update)


def _model_file(folder: Path) -> Path:
    """The ONNX file named by the MLmodel file of a downloaded model (must stay in ``folder``)."""
    import yaml

    data = "model.onnx"
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        meta = yaml.safe_load(mlmodel.read_text()) or {}
        data = str(meta.get("flavors", {}).get("onnx", {}).get("data", data))
    path = (folder / data).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise LoadError(f"the downloaded model has no ONNX file at {data!r}")
    if path.suffix.lower() != ".onnx":  # serving loads ONNX graphs only, never pickles & co.
        raise LoadError(f"the model file {data!r} is not an .onnx file; serving loads only ONNX")
    return path


def is_generation_folder(folder: Path) -> bool:
    """A generation model's folder: encoder + decoder graphs described by seq2seq.json."""
    from bladeflow.core.generation import SPEC_FILE

    return (folder / SPEC_FILE).is_file()


def _tokenizer_dir(folder: Path) -> Path | None:
    for candidate in (folder / "extra_files" / "tokenizer", folder / "tokenizer"):
        if candidate.is_dir():
            return candidate
    return None


def _dims(shape: Any) -> list[int | str | None]:
    return [d if isinstance(d, int | str) else None for d in shape]


def runtime_file_config(folder: Path) -> SessionConfig | None:
    """The ``bladeflow_runtime.json`` next to the model, if any (the recipe tag wins)."""
    for candidate in (
        folder / "extra_files" / registry.RUNTIME_FILE,
        folder / registry.RUNTIME_FILE,
    ):
        if candidate.is_file():
            return SessionConfig(**json.loads(candidate.read_text()))
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
