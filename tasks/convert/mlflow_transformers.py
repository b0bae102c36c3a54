"""MLflow transformers-flavor encoder-decoders -> a Hugging Face seq2seq folder.

MLflow 3's transformers flavor stores a model as ``MLmodel`` + ``model/`` (``save_pretrained``:
``config.json``, weights, ``generation_config.json``) + ``components/<name>/`` (``tokenizer``,
``feature_extractor``; ``processor`` when one was logged). A source that is such a model
(``models:/NAME/V``, ``models:/NAME@ALIAS``, ``runs:/ID/PATH`` or a local MLflow model folder)
whose ``model/config.json`` declares a supported encoder-decoder is *claimed* here: detection
reads the ``MLmodel`` file and ``model/config.json`` only (two small downloads), and
:func:`local_folder` downloads the whole model once per process and lays it out as the folder the
``seq2seq`` converter takes (weights, generation config, tokenizer and feature extractor side by
side). Transformers models that are not encoder-decoders keep going through
``mlflow_source.py`` (which refuses generation models with the same message as a folder).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from bladeflow.core.errors import ModelFileError

SCHEMES = ("models:/", "runs:/")
MODEL_DIR = "model"  # mlflow.transformers.model_io._MODEL_BINARY_FILE_NAME
COMPONENTS_DIR = "components"  # mlflow.transformers.model_io._COMPONENTS_BINARY_DIR_NAME
# Components copied beside the weights; the processor last, so its files win (it bundles the
# tokenizer and the feature extractor of speech models).
_COMPONENTS = ("tokenizer", "feature_extractor", "image_processor", "processor")
_HOW_TO_LOG = (
    "mlflow.transformers.log_model({'model': model, 'tokenizer': tokenizer}, name='model', "
    "task=..., save_pretrained=True) (speech models: add 'feature_extractor')"
)

_lock = threading.Lock()
_folders: dict[str, Path] = {}  # pinned source -> assembled folder, for this process
_probes: dict[str, tuple[dict[str, Any], dict[str, Any]] | None] = {}  # pinned -> (flavor, config)
_scratch: list[Path] = []


def is_mlflow_source(source: str) -> bool:
    """An MLflow model URI, or a local folder holding an ``MLmodel`` file."""
    return source.startswith(SCHEMES) or (Path(source) / "MLmodel").is_file()


def claims(source: str) -> bool:
    """Whether ``source`` is an MLflow transformers model of a supported encoder-decoder.

    Never raises: a URI that cannot be read is left to the ``mlflow`` converter, which reports
    why (unknown model, unreachable registry) with exit 2 or 4.
    """
    if not is_mlflow_source(source):
        return False
    try:
        probe = _probe(source)
    except (ModelFileError, OSError, ValueError):
        return False
    from bladeflow.tasks.convert.seq2seq_source import is_seq2seq_config

    return probe is not None and is_seq2seq_config(probe[1])


def refuse_other_generation(source: str) -> None:
    """A local MLflow transformers folder of any other generation model (decoder-only LMs,
    headless or unsupported encoder-decoders) gets the refusal a Hugging Face folder gets
    (``models:/`` and ``runs:/`` URIs get it from ``mlflow_source.resolve``).

    Raises:
        ModelFileError: such a generation model (exit 2), saying what is supported.
    """
    if source.startswith(SCHEMES) or not (Path(source) / "MLmodel").is_file():
        return
    probe = _probe(source)
    if probe is None:
        return
    from bladeflow.tasks.convert.hf_source import refuse_generation_model
    from bladeflow.tasks.convert.mlflow_source import refuse_generation_flavor

    refuse_generation_flavor(probe[0], source)
    refuse_generation_model(Path(source) / MODEL_DIR)


def precheck(source: str) -> None:
    """From the ``MLmodel`` file alone: weights and the components serving needs were logged.

    Raises:
        ModelFileError: not a transformers model, logged without weights (a Hub reference), a
            PEFT adapter, or without its tokenizer (text) / feature extractor and tokenizer
            (speech).
    """
    probe = _probe(source)
    if probe is None:
        raise ModelFileError(f"{source} is not an MLflow transformers model")
    flavor, config = probe
    if not flavor.get("model_binary"):
        raise ModelFileError(
            f"{source} is a transformers model logged without its weights (save_pretrained="
            f"False: a reference to {flavor.get('source_model_name') or 'the Hub'!r}). bladeflow "
            f"converts the weights it is given: log it again with {_HOW_TO_LOG}."
        )
    if flavor.get("peft_adaptor"):
        raise ModelFileError(
            f"{source} is a PEFT adapter; merge it into the model (merge_and_unload()) and log "
            f"the merged model with {_HOW_TO_LOG}."
        )
    from bladeflow.tasks.convert.seq2seq_source import SPEECH_TYPES

    logged = set(flavor.get("components") or [])
    if flavor.get("processor_type"):
        logged |= {"tokenizer", "feature_extractor"}  # a processor bundles both
    speech = config.get("model_type") in SPEECH_TYPES
    needed = {"tokenizer", "feature_extractor"} if speech else {"tokenizer"}
    missing = sorted(needed - logged)
    if missing:
        raise ModelFileError(
            f"{source} holds an encoder-decoder ({config.get('model_type')}) but no "
            f"{' or '.join(missing)} was logged with it (components: {sorted(logged) or 'none'}): "
            "bladeflow needs it to turn requests into model inputs and generated ids back into "
            f"text. Log the model again with {_HOW_TO_LOG}."
        )


def resolve_folder(source: str | Path) -> Path:
    """``source`` as a local Hugging Face folder: MLflow sources through :func:`local_folder`,
    paths as they are."""
    if isinstance(source, str) and is_mlflow_source(source):
        return local_folder(source)
    return Path(source)


def local_folder(source: str) -> Path:
    """The Hugging Face folder of an MLflow seq2seq ``source``: downloaded and assembled once per
    process (per pinned version: ``models:/NAME@ALIAS`` is resolved to its version first, so a
    moved alias is downloaded again).

    Raises:
        ModelFileError: the model cannot be downloaded, or is not a loggable seq2seq model
            (see :func:`precheck`).
    """
    precheck(source)
    key = _pin(source)
    with _lock:
        if key in _folders and (_folders[key] / "config.json").is_file():
            return _folders[key]
        root = _scratch_dir()
        local = _download(source, root / "mlflow") if source.startswith(SCHEMES) else Path(source)
        folder = assemble(local, root / "hf")
        _folders[key] = folder
        return folder


def assemble(local: Path, dst: Path) -> Path:
    """Lay out the MLflow model folder ``local`` as one Hugging Face folder ``dst``: the files of
    ``model/`` and of each ``components/<name>/`` side by side (the weights' own files win)."""
    model = local / MODEL_DIR
    if not (model / "config.json").is_file():
        raise ModelFileError(
            f"{local} has no {MODEL_DIR}/config.json: not a transformers model saved with its "
            f"weights. Log it with {_HOW_TO_LOG}."
        )
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(model, dst)
    own = {p.name for p in dst.iterdir()}
    for name in _COMPONENTS:
        comp = local / COMPONENTS_DIR / name
        if not comp.is_dir():
            continue
        for item in sorted(comp.iterdir()):
            if item.is_file() and item.name not in own:
                shutil.copy2(item, dst / item.name)
    return dst


# -- pieces -----------------------------------------------------------------------------------


def _probe(source: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(transformers flavor conf, model/config.json) or None when the flavor is not there."""
    key = _pin(source)
    with _lock:
        if key in _probes:
            return _probes[key]
    if source.startswith(SCHEMES):
        _require_reachable()
        scratch = Path(tempfile.mkdtemp(prefix="bladeflow-mlmodel-"))
        try:
            mlmodel = _download(_join(source, "MLmodel"), scratch)
            flavor = _flavor(mlmodel, source)
            config: dict[str, Any] = {}
            if flavor is not None:
                path = _download(_join(source, f"{MODEL_DIR}/config.json"), scratch)
                config = _read_json(path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        flavor = _flavor(Path(source) / "MLmodel", source)
        config = _read_json(Path(source) / MODEL_DIR / "config.json") if flavor else {}
    probe = (flavor, config) if flavor is not None else None
    with _lock:
        _probes[key] = probe
    return probe


def _flavor(mlmodel: Path, source: str) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load(mlmodel.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelFileError(f"cannot read the MLmodel file of {source}: {exc}") from exc
    flavors = data.get("flavors") if isinstance(data, dict) else None
    conf = flavors.get("transformers") if isinstance(flavors, dict) else None
    return conf if isinstance(conf, dict) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _join(uri: str, sub: str) -> str:
    return uri.rstrip("/") + "/" + sub


def _download(uri: str, dst: Path) -> Path:
    from bladeflow.tasks.convert.mlflow_source import download

    return download(uri, dst)


def _pin(source: str) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (what the alias points at now); other
    sources as they are (versions, runs and logged model ids do not change)."""
    if not source.startswith("models:/") or "@" not in source:
        if source.startswith(SCHEMES):
            return source
        path = Path(source).resolve()
        mlmodel = path / "MLmodel"
        stamp = mlmodel.stat().st_mtime_ns if mlmodel.is_file() else 0
        return f"{path}@{stamp}"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, alias = source[len("models:/") :].partition("@")
    alias, _, rest = alias.partition("/")
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    except MlflowException:
        return source  # the download reports it
    return f"models:/{name}/{version}" + (f"/{rest}" if rest else "")


def _require_reachable() -> None:
    """An HTTP tracking server that does not answer: fail now instead of MLflow's long retries
    (detection treats it as not claimed; the CLI's preflight then exits 4 naming the server)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=5)
    except httpx.HTTPError as exc:
        raise ModelFileError(f"MLflow at {uri} does not answer: {exc}") from exc


def _scratch_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="bladeflow-mlflow-seq2seq-"))
    if not _scratch:
        atexit.register(_cleanup)
    _scratch.append(root)
    return root


def _cleanup() -> None:
    for root in _scratch:
        shutil.rmtree(root, ignore_errors=True)
