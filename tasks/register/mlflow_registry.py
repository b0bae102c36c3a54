"""Log a flow run to MLflow and register its chosen model, all or nothing.

One MLflow run per flow run. The chosen model is logged with ``mlflow.onnx.log_model`` and becomes
a new version of the registered model, with the schema tags of :mod:`bladeflow.registry` set at
creation and the ``candidate`` alias moved to it. If anything fails after the version exists, the
version is deleted again: a half-registered version never stays behind.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from bladeflow import registry
from bladeflow.contract import Candidate, Signature
from bladeflow.errors import RegistryError, UserInputError
from bladeflow.settings import Settings

_METRIC_SAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def client(settings: Settings) -> Any:
    """An MlflowClient for the settings' tracking and registry URIs."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)


def ensure_experiment(settings: Settings) -> str:
    """The experiment id for ``settings.experiment``, created with the artifact root if new."""
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        exp = c.get_experiment_by_name(settings.experiment)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(
                c.create_experiment(settings.experiment, artifact_location=settings.artifact_root)
            )
        except MlflowException:
            exp = c.get_experiment_by_name(settings.experiment)  # created concurrently
            if exp is None:
                raise
            return str(exp.experiment_id)
    except MlflowException as exc:
        raise RegistryError(
            f"cannot use MLflow at {settings.tracking_uri}: {exc.message}. Check --tracking-uri / "
            "MLFLOW_TRACKING_URI and that the server is running."
        ) from exc


def start_run(settings: Settings, model_name: str, params: dict[str, Any]) -> str:
    """Create the MLflow run of one flow run and log its parameters; return the run id."""
    c = client(settings)
    run = c.create_run(
        ensure_experiment(settings),
        run_name=f"optimize-{model_name}",
        tags={"bladeflow.model": model_name, "bladeflow.flow": "optimize"},
    )
    from mlflow.entities import Param

    c.log_batch(run.info.run_id, params=[Param(k, _param(v)) for k, v in params.items()])
    return str(run.info.run_id)


def log_metrics(settings: Settings, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = _now_ms()
    items = [Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items() if np.isfinite(v)]
    c = client(settings)
    for start in range(0, len(items), 500):  # MLflow caps a batch at 1000 entries
        c.log_batch(run_id, metrics=items[start : start + 500])


def log_candidate_run(
    settings: Settings,
    parent_run_id: str,
    candidate: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str],
) -> str:
    """A nested MLflow run for one candidate: its recipe as params, accuracy/latency as metrics."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    c = client(settings)
    parent = c.get_run(parent_run_id)
    run = c.create_run(
        parent.info.experiment_id,
        run_name=f"candidate-{candidate}",
        tags={MLFLOW_PARENT_RUN_ID: parent_run_id, "bladeflow.candidate": candidate, **tags},
    )
    now = _now_ms()
    c.log_batch(
        run.info.run_id,
        params=[Param(k, _param(v)) for k, v in params.items()],
        metrics=[
            Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items() if np.isfinite(v)
        ],
        tags=[RunTag("bladeflow.gate", tags.get("bladeflow.gate", ""))],
    )
    c.set_terminated(run.info.run_id, status="FINISHED")
    return str(run.info.run_id)


def log_artifacts(settings: Settings, run_id: str, folder: Path, artifact_path: str) -> None:
    client(settings).log_artifacts(run_id, str(folder), artifact_path)


def end_run(settings: Settings, run_id: str, status: str, tags: dict[str, str]) -> None:
    c = client(settings)
    for key, value in tags.items():
        c.set_tag(run_id, key, value)
    c.set_terminated(run_id, status=status)


def register(
    settings: Settings,
    run_id: str,
    name: str,
    candidate: Candidate,
    tags: dict[str, str],
    description: str,
    input_example: dict[str, np.ndarray] | None,
) -> tuple[str, str]:
    """Log ``candidate``'s model to ``run_id`` and register it as a new version of ``name``.

    Returns:
        (version, model URI ``models:/NAME/VERSION``).
    """
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.exceptions import MlflowException

    registry.check_model_name(name)
    # log_model is fluent-only: it needs the process-wide tracking URI. The registry URI stays
    # untouched (everything registry-side goes through an explicit client).
    mlflow.set_tracking_uri(settings.tracking_uri)
    c = client(settings)

    workdir = Path(candidate.artifact.path).parent
    runtime_file = workdir / registry.RUNTIME_FILE
    runtime_file.write_text(json.dumps(candidate.session.model_dump(mode="json"), indent=2))
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(candidate.artifact.path),
                name="model",
                signature=_mlflow_signature(candidate.artifact.signature),
                input_example=input_example,
                onnx_session_options=_mlflow_session_options(candidate),
                onnx_execution_providers=list(candidate.session.providers),
                extra_files=_extra_files(runtime_file, candidate),
                save_as_external_data=candidate.artifact.size_bytes > (1 << 30),
            )
        _ensure_registered_model(c, name)
    except MlflowException as exc:
        raise RegistryError(f"logging the model to MLflow failed: {exc.message}") from exc

    version = None
    try:
        mv = c.create_model_version(
            name=name,
            source=info.model_uri,
            run_id=run_id,
            tags=tags,
            description=description,
            model_id=info.model_id,
        )
        version = str(mv.version)
        _await_ready(c, name, version)
        c.set_registered_model_alias(name, registry.ALIAS_CANDIDATE, version)
    except BaseException as exc:
        if version is not None:
            _delete_quietly(c, name, version)
        if isinstance(exc, MlflowException):
            raise RegistryError(f"registering {name!r} failed: {exc.message}") from exc
        raise
    return version, f"models:/{name}/{version}"


def _extra_files(runtime_file: Path, candidate: Candidate) -> list[str]:
    """Files logged with the model: the runtime config, and a tokenizer folder when there is one
    (it lands in ``extra_files/tokenizer`` so serving can accept raw text)."""
    files = [str(runtime_file)]
    tokenizer = candidate.artifact.assets.get("tokenizer")
    if tokenizer and Path(tokenizer).is_dir():
        if Path(tokenizer).name != "tokenizer":
            raise ValueError(f"tokenizer asset must be a folder named 'tokenizer': {tokenizer}")
        files.append(str(tokenizer))
    return files


def metric_name(key: str) -> str:
    """Make ``key`` a valid MLflow metric name (output names may contain ':' etc.)."""
    return _METRIC_SAFE.sub("_", key)


def _ensure_registered_model(c: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        c.create_registered_model(
            name,
            tags={registry.MODEL_TAG_CANARY_WEIGHT: "0"},
            description="Registered by bladeflow. Versions carry bladeflow.* tags.",
        )
    except MlflowException as exc:
        if exc.error_code == "INVALID_PARAMETER_VALUE":
            raise UserInputError(f"MLflow refuses the model name {name!r}: {exc.message}") from exc
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # created concurrently: fine
            raise


def _await_ready(c: Any, name: str, version: str, timeout_s: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = c.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(f"model version {name}/{version} did not become READY ({status})")
        time.sleep(0.5)


def _delete_quietly(c: Any, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    # The original error is what the user needs; a leftover would carry no alias anyway.
    with contextlib.suppress(MlflowException):
        c.delete_model_version(name, version)


def _mlflow_signature(sig: Signature) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def schema(specs: list[Any]) -> Schema:
        return Schema(
            [
                TensorSpec(
                    np.dtype(s.dtype),
                    tuple(d if isinstance(d, int) else -1 for d in s.shape),
                    s.name,
                )
                for s in specs
            ]
        )

    return ModelSignature(inputs=schema(sig.inputs), outputs=schema(sig.outputs))


def _mlflow_session_options(candidate: Candidate) -> dict[str, Any]:
    cfg = candidate.session
    levels = {"disable": 0, "basic": 1, "extended": 2, "all": 99}
    options: dict[str, Any] = {
        "execution_mode": cfg.execution_mode,
        "graph_optimization_level": levels[cfg.graph_optimization_level],
    }
    if cfg.intra_op_num_threads:
        options["intra_op_num_threads"] = cfg.intra_op_num_threads
    if cfg.inter_op_num_threads:
        options["inter_op_num_threads"] = cfg.inter_op_num_threads
    if not cfg.allow_spinning:
        options["extra_session_config"] = {"session.intra_op.allow_spinning": "0"}
    return options


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's param value limit


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
