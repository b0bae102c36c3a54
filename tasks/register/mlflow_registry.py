"""Log a flow run to MLflow and register its chosen model, all or nothing.

One MLflow run per flow run. The chosen model is logged with ``mlflow.onnx.log_model`` and becomes
a new version of the registered model, with the schema tags of :mod:`bladeflow.core.registry` set at
creation and the ``candidate`` alias moved to it. If anything fails after the version exists, the
version is deleted again: a half-registered version never stays behind. A version gets
``bladeflow.validated=true`` only once it is READY, and only then the alias; a process killed in
between leaves a version without that tag, which the next run of the same model deletes when it
marks the dead process's run KILLED (:func:`reap_stale_runs`).

Every MLflow call fails with a :class:`RegistryError` (exit 4) within bounded time: MLflow's own
HTTP retries default to 7 with backoff factor 2 (about 4 minutes per call against a stopped
server); bladeflow lowers the defaults (:mod:`bladeflow.core.mlflow_client`) unless the
environment sets them.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bladeflow.core import registry
from bladeflow.core.contract import Candidate, Signature
from bladeflow.core.errors import RegistryError, UserInputError
from bladeflow.core.faults import fault_point
from bladeflow.core.locks import sqlite_path, sqlite_setup_lock
from bladeflow.core.mlflow_client import mlflow_client
from bladeflow.core.redact import redact
from bladeflow.core.settings import Settings

_METRIC_SAFE = re.compile(r"[^A-Za-z0-9_\-. /]")

TAG_OWNER = registry.RUN_TAG_OWNER
FOLDER_FORMAT = "seq2seq"  # artifacts of this format are a folder, logged whole (_log_folder)
client = mlflow_client  # the one factory (bladeflow.core.mlflow_client), kept under its old name


@contextlib.contextmanager
def mlflow_errors(settings: Settings, what: str) -> Iterator[None]:
    """Turn a failure to reach MLflow or its artifact store into a RegistryError (exit 4)."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as exc:
        if not _is_service_error(exc):
            raise
        detail = getattr(exc, "message", None) or str(exc)
        raise RegistryError(
            redact(
                f"{what} failed: MLflow at {settings.tracking_uri} (or its artifact store) did "
                f"not answer ({type(exc).__name__}: {detail[:600]}). Check that the tracking "
                "server and the artifact store (S3) are running and reachable; nothing was "
                "registered by this step."
            )
        ) from exc


def _is_service_error(exc: BaseException) -> bool:
    """Errors that mean "the server or the store is unusable", not "bladeflow has a bug"."""
    from mlflow.exceptions import MlflowException

    kinds: list[type[BaseException]] = [MlflowException, ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import requests

        kinds.append(requests.exceptions.RequestException)
    with contextlib.suppress(ImportError):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        kinds += [Boto3Error, BotoCoreError, ClientError]
    return isinstance(exc, tuple(kinds))


def ensure_experiment(settings: Settings) -> str:
    """The experiment id for ``settings.experiment``, created with the artifact root if new.

    The first use of a SQLite database creates and migrates it; runs started together on a new
    home would race through that migration, so it happens under an inter-process lock.
    """
    found = _sqlite_experiment(settings)
    if found is not None:
        _check_artifact_store(settings, found[1])
        return found[0]
    with sqlite_setup_lock(settings.tracking_uri), _quiet_schema_setup():
        experiment_id = _ensure_experiment(settings)
    _mark_sqlite_checked(settings)
    return experiment_id


# Beside a SQLite database: the MLflow version that last created/verified it through MLflow's own
# store. While it matches the installed MLflow, an existing experiment is looked up with sqlite3
# (milliseconds) instead of importing MLflow's SQLAlchemy store (~4 s of a command's start).
_CHECKED_SUFFIX = ".bladeflow-checked"


@contextlib.contextmanager
def _quiet_schema_setup() -> Iterator[None]:
    """MLflow and alembic announce a new database's tables at INFO on the console, before the
    run's log file exists; the command's own lines say what happens."""
    import logging

    loggers = [logging.getLogger(n) for n in ("mlflow.store.db.utils", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def _sqlite_experiment(settings: Settings) -> tuple[str, str] | None:
    """(id, artifact location) of an active experiment in a SQLite database MLflow already
    verified; None whenever MLflow itself must look (no database yet, another MLflow version,
    no such experiment, any SQLite error)."""
    import sqlite3

    db = sqlite_path(settings.tracking_uri)
    if db is None or not db.is_file():
        return None
    marker = db.with_name(db.name + _CHECKED_SUFFIX)
    try:
        if marker.read_text().strip() != _mlflow_version():
            return None
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as c:
            row = c.execute(
                "SELECT experiment_id, artifact_location, lifecycle_stage FROM experiments "
                "WHERE name = ?",
                (settings.experiment,),
            ).fetchone()
    except (OSError, sqlite3.Error):
        return None
    if row is None or row[2] != "active" or not row[1]:
        return None
    return str(row[0]), str(row[1])


def _mark_sqlite_checked(settings: Settings) -> None:
    db = sqlite_path(settings.tracking_uri)
    if db is None or not db.is_file():
        return
    with contextlib.suppress(OSError):  # only a cache: without it the next start is slower
        db.with_name(db.name + _CHECKED_SUFFIX).write_text(_mlflow_version() + "\n")


def _ensure_experiment(settings: Settings) -> str:
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        exp = c.get_experiment_by_name(settings.experiment)
        if exp is not None:
            _check_artifact_store(settings, exp.artifact_location)
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
            redact(
                f"cannot use MLflow at {settings.tracking_uri}: {exc.message}. Check "
                "--tracking-uri / MLFLOW_TRACKING_URI and that the server is running."
            )
        ) from exc


def _check_artifact_store(settings: Settings, location: str) -> None:
    """Fail before any work when the experiment's S3 artifact store has no credentials here.

    Typical case: ``bladeflow up`` created the experiment (artifacts in its S3 bucket), the stack
    is down, and the CLI now talks to the database directly without the stack's environment.
    """
    if not location.startswith("s3://"):
        return
    import boto3

    if boto3.session.Session().get_credentials() is not None:
        return
    raise RegistryError(
        f"experiment {settings.experiment!r} at {redact(settings.tracking_uri)} keeps its "
        f"artifacts in {location}, and no AWS credentials are set here. If `bladeflow up` "
        "created it, start the stack and `source <home>/stack/env.sh` (it sets the S3 endpoint "
        "and keys); otherwise set AWS credentials and MLFLOW_S3_ENDPOINT_URL, or choose another "
        "experiment with BLADEFLOW_EXPERIMENT. Nothing was registered."
    )


def start_run(settings: Settings, model_name: str, params: dict[str, Any]) -> str:
    """Create the MLflow run of one flow run and log its parameters; return the run id.

    Runs of ``model_name`` left RUNNING by a process that died first are marked KILLED.
    """
    experiment_id = ensure_experiment(settings)
    with mlflow_errors(settings, "starting the MLflow run"):
        from bladeflow.tasks.register.stale_runs import owner, reap_stale_runs

        reap_stale_runs(client(settings), model_name, experiment_id)
        c = client(settings)
        run = c.create_run(
            experiment_id,
            run_name=f"optimize-{model_name}",
            tags={
                registry.RUN_TAG_MODEL: model_name,
                registry.RUN_TAG_FLOW: "optimize",
                TAG_OWNER: json.dumps(owner(), sort_keys=True),
            },
        )
        from mlflow.entities import Param

        c.log_batch(run.info.run_id, params=[Param(k, _param(v)) for k, v in params.items()])
    return str(run.info.run_id)


def log_metrics(settings: Settings, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = _now_ms()
    items = [Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items() if np.isfinite(v)]
    with mlflow_errors(settings, "logging metrics"):
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

    tags = {k: redact(v) for k, v in tags.items()}
    with mlflow_errors(settings, f"logging candidate {candidate!r}"):
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
                Metric(metric_name(k), float(v), now, 0)
                for k, v in metrics.items()
                if np.isfinite(v)
            ],
            tags=[RunTag("bladeflow.gate", tags.get("bladeflow.gate", ""))],
        )
        c.set_terminated(run.info.run_id, status="FINISHED")
    return str(run.info.run_id)


def log_artifacts(settings: Settings, run_id: str, folder: Path, artifact_path: str) -> None:
    with mlflow_errors(settings, f"uploading {artifact_path}/ artifacts"):
        client(settings).log_artifacts(run_id, str(folder), artifact_path)


def end_run(
    settings: Settings, run_id: str, status: str, tags: dict[str, str], quiet: bool = False
) -> None:
    """Tag and terminate the run. ``quiet``: on the failure path, where the original error is
    what the user needs, a registry that cannot be reached is not reported again."""
    try:
        with mlflow_errors(settings, "ending the MLflow run"):
            c = client(settings)
            for key, value in tags.items():
                c.set_tag(run_id, key, redact(value))
            c.set_terminated(run_id, status=status)
    except RegistryError:
        if not quiet:
            raise


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
        # An explicit run_id and a logged model created in the run's experiment, not
        # `with mlflow.start_run(run_id)`: leaving that block marks the run FINISHED, so a crash
        # later in registration would leave a "successful" run without a version.
        with mlflow_errors(settings, "logging the model"):
            logged = c.create_logged_model(
                experiment_id=c.get_run(run_id).info.experiment_id,
                name="model",
                source_run_id=run_id,
            )
            if candidate.artifact.format == FOLDER_FORMAT:
                model_uri, model_id = _log_folder(c, logged.model_id, candidate), logged.model_id
            else:
                info = mlflow.onnx.log_model(
                    onnx.load(candidate.artifact.path),
                    name="model",
                    signature=_mlflow_signature(candidate.artifact.signature),
                    input_example=input_example,
                    onnx_session_options=_mlflow_session_options(candidate),
                    onnx_execution_providers=list(candidate.session.providers),
                    extra_files=_extra_files(runtime_file, candidate),
                    save_as_external_data=candidate.artifact.size_bytes > (1 << 30),
                    run_id=run_id,
                    model_id=logged.model_id,
                )
                model_uri, model_id = info.model_uri, info.model_id
        fault_point("register.model_logged")
        with mlflow_errors(settings, f"creating registered model {name!r}"):
            _ensure_registered_model(c, name)
    except MlflowException as exc:
        raise RegistryError(f"logging the model to MLflow failed: {exc.message}") from exc

    # validated=true goes on last, once the version is READY: until then the version is visibly
    # unfinished (and deleted again by this function or, after a crash, by reap_stale_runs).
    validated = tags.get(registry.TAG_VALIDATED)
    pending = {k: redact(v) for k, v in tags.items() if k != registry.TAG_VALIDATED}
    version = None
    try:
        with mlflow_errors(settings, f"registering {name!r}"):
            mv = c.create_model_version(
                name=name,
                source=model_uri,
                run_id=run_id,
                tags=pending,
                description=description,
                model_id=model_id,
            )
            version = str(mv.version)
            fault_point("register.version_created")
            _await_ready(c, name, version)
            if validated is not None:
                c.set_model_version_tag(name, version, registry.TAG_VALIDATED, validated)
            fault_point("register.validated")
            c.set_registered_model_alias(name, registry.ALIAS_CANDIDATE, version)
            fault_point("register.alias_set")
    except BaseException:
        if version is not None:
            delete_quietly(c, name, version)
        raise
    return version, f"models:/{name}/{version}"


def _log_folder(c: Any, model_id: str, candidate: Candidate) -> str:
    """Log a model that is a folder (a generation model: two graphs, seq2seq.json, tokenizer,
    generation config, runtime config) as the logged model's artifacts, with an MLmodel file
    naming it (flavor ``bladeflow_seq2seq``; no pyfunc: nothing to unpickle). Returns its URI."""
    import tempfile

    from mlflow.models import Model

    folder = Path(candidate.artifact.path).parent
    with tempfile.TemporaryDirectory(prefix="bladeflow-mlmodel-") as tmp:
        meta = Model(model_id=model_id)
        meta.add_flavor(
            FOLDER_FORMAT,
            spec=Path(candidate.artifact.path).name,
            runtime=registry.RUNTIME_FILE,
            format=candidate.artifact.format,
        )
        meta.save(str(Path(tmp) / "MLmodel"))
        c.log_model_artifacts(model_id, str(folder))
        c.log_model_artifacts(model_id, tmp)
    c.finalize_logged_model(model_id, "READY")
    return f"models:/{model_id}"


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


def delete_quietly(c: Any, name: str, version: str) -> None:
    # The original error is what the user needs; a leftover carries no alias and no
    # validated=true, and the next run deletes it (reap_stale_runs).
    try:
        c.delete_model_version(name, version)
    except Exception as exc:
        if not _is_service_error(exc):
            raise


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
    return redact(text)[:6000]  # MLflow's param value limit


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
