"""The benchmark as its own flow, so it can run on the hardware the model will serve on.

A benchmark only means something on the target hardware. The optimize flow with
``benchmark_work_pool=POOL`` uploads the passing candidates, the converted source and the
validation data to its MLflow run, starts the ``benchmark/benchmark-on-POOL`` deployment (a worker
on that pool, e.g. on a GPU machine, picks it up), waits for it, and reads the report the run
wrote back to MLflow. MLflow is the only thing both sides share: no shared disk, no result storage.

Register the deployment with ``python -m bladeflow.flows.deployments --target-pool POOL`` and
start a worker on that hardware with ``prefect worker start --pool POOL``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from bladeflow.core.contract import BenchmarkReport, SessionConfig
from bladeflow.core.environment import hardware
from bladeflow.core.errors import BladeflowError
from bladeflow.core.mlflow_client import mlflow_client
from bladeflow.core.settings import Settings

REMOTE_DIR = "remote-benchmark"  # artifact folder of the optimize run
REPORT_FILE = "report.json"


class RemoteModel(BaseModel):
    artifact_path: str = Field(description="path of the model.onnx inside the MLflow run")
    session: SessionConfig = Field(default_factory=SessionConfig)


class BenchmarkRequest(BaseModel):
    """What the benchmark flow needs: everything lives in one MLflow run."""

    tracking_uri: str
    run_id: str
    models: dict[str, RemoteModel]
    data_path: str = Field(description="path of the validation .npz inside the MLflow run")
    batch_sizes: list[int]
    warmup: int = 5
    rounds: int = 5
    iterations: int = 20
    max_seconds: float = 10.0
    report_path: str = Field(description="folder inside the run to write report.json to")


class RemoteBenchmarkError(BladeflowError):
    """The benchmark deployment did not produce a report."""


@flow(name="benchmark")
def benchmark_flow(request: BenchmarkRequest) -> dict[str, Any]:
    """Download the models and data from the MLflow run, time them here, log the report back."""
    import mlflow.artifacts

    from bladeflow.tasks.benchmark.incumbent import onnx_artifact
    from bladeflow.tasks.benchmark.latency import BenchmarkSettings, benchmark

    logger = get_run_logger()
    here = hardware()
    logger.info("benchmark: %d models on %s", len(request.models), here)
    with tempfile.TemporaryDirectory(prefix="bladeflow-remote-bench-") as tmp:
        folder = Path(tmp)

        def fetch(path: str) -> Path:
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=request.run_id,
                    artifact_path=path,
                    dst_path=str(folder),
                    tracking_uri=request.tracking_uri,
                )
            )

        models = {
            label: (
                onnx_artifact(
                    fetch(remote.artifact_path), f"runs:/{request.run_id}/{remote.artifact_path}"
                ),
                remote.session,
            )
            for label, remote in request.models.items()
        }
        with np.load(fetch(request.data_path), allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        started = time.perf_counter()
        report = benchmark(
            models,
            data,
            request.batch_sizes,
            BenchmarkSettings(
                warmup=request.warmup,
                rounds=request.rounds,
                iterations=request.iterations,
                max_seconds=request.max_seconds,
            ),
            progress=logger.info,
        )
        out = folder / "out"
        out.mkdir()
        doc = {
            "hardware": here,
            "elapsed_s": round(time.perf_counter() - started, 2),
            "report": report.model_dump(mode="json"),
        }
        (out / REPORT_FILE).write_text(json.dumps(doc, indent=2))
        mlflow_client(Settings.from_env(tracking_uri=request.tracking_uri)).log_artifacts(
            request.run_id, str(out), request.report_path
        )
    return doc


def deployment_name(pool: str) -> str:
    return f"benchmark-on-{pool}"


def run_remote(
    request: BenchmarkRequest, pool: str, timeout_s: float
) -> tuple[BenchmarkReport, dict[str, Any]]:
    """Start ``benchmark/benchmark-on-POOL``, wait up to ``timeout_s``, return report + hardware.

    A run no worker picked up in time is cancelled, so a worker that comes back later does not
    benchmark a stale request.
    """
    import mlflow.artifacts
    from prefect import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled

    name = f"benchmark/{deployment_name(pool)}"
    try:
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync call: a FlowRun
            name,
            parameters={"request": request.model_dump(mode="json")},
            timeout=timeout_s,
            as_subflow=True,
        )
    except ObjectNotFound:
        raise RemoteBenchmarkError(
            f"deployment {name!r} is not registered: run `python -m bladeflow.flows.deployments "
            f"--target-pool {pool}` (or `bladeflow up --target-pool {pool}`) first"
        ) from None
    state = run.state
    if state is None or not state.is_completed():
        if state is not None and not state.is_final():
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run.id, Cancelled(message="timed out"), force=True)
        raise RemoteBenchmarkError(
            f"the benchmark on work pool {pool!r} did not complete within {timeout_s:.0f} s "
            f"(flow run {run.id}, state {state.name if state else 'unknown'}). Is a worker "
            f"polling it? Start one on the target hardware: prefect worker start --pool {pool}"
        )
    with tempfile.TemporaryDirectory(prefix="bladeflow-remote-report-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=request.run_id,
            artifact_path=f"{request.report_path}/{REPORT_FILE}",
            dst_path=tmp,
            tracking_uri=request.tracking_uri,
        )
        doc = json.loads(Path(path).read_text())
    return BenchmarkReport.model_validate(doc["report"]), doc["hardware"]
