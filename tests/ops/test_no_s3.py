"""`bladeflow up --no-s3`: MLflow, Prefect and a worker without SeaweedFS, artifacts in a folder.

Same approach as test_stack_e2e: real servers on free loopback ports, a run triggered through the
REST API as the UI does, and every process stopped at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from mlflow import MlflowClient
from typer.testing import CliRunner

from bladeflow.app import stack, stack_cli, stack_proc
from bladeflow.app.stack import StackConfig
from tests import models
from tests.ops.test_stack_e2e import _bench, _run_deployment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def no_s3_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    cfg = StackConfig(
        home=tmp_path_factory.mktemp("nos3"),
        prefect_port=stack_proc.free_port(),
        mlflow_port=stack_proc.free_port(),
        s3=False,
        timeout_s=240,
    )
    saved = dict(os.environ)
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        timings = stack.start_stack(cfg)
        print(f"--no-s3 stack start-up seconds: {timings}")
        yield cfg
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stack.stop_stack(cfg, grace_s=5)


def test_no_s3_stack_runs_optimize_with_artifacts_in_the_local_folder(
    no_s3_stack: StackConfig,
) -> None:
    # setup
    cfg = no_s3_stack
    app = typer.Typer()
    app.command()(stack_cli.up)
    src = models.mlp(cfg.home / "sources" / "mlp.onnx")
    params = {"source": str(src), "name": "mlp-nos3", "batch_sizes": [1], "bench": _bench()}
    params["passes"] = "ort_graph:level=extended"
    # execute: status without port flags (read from the records), then a run as the UI does it
    status = CliRunner().invoke(app, ["--status", "--home", str(cfg.home)])
    run = _run_deployment(cfg, "optimize/optimize", {"params": params})
    # assert
    assert status.exit_code == 0, status.output
    states = {line.split()[0]: line.split()[1] for line in status.output.splitlines() if line}
    assert states == {
        "s3": "stopped",
        "mlflow": "healthy",
        "prefect": "healthy",
        "worker": "healthy",
    }
    assert not (cfg.state_dir / "s3-data").exists()
    assert "MLFLOW_S3_ENDPOINT_URL" not in cfg.env_file.read_text()
    assert run["state"]["type"] == "COMPLETED", run["state"].get("message")
    c = MlflowClient(cfg.mlflow_url, cfg.mlflow_url)
    mv = c.get_model_version_by_alias("mlp-nos3", "candidate")
    assert str(mv.version) == "1" and mv.tags["bladeflow.validated"] == "true"
    assert c.get_run(str(mv.run_id)).info.artifact_uri.startswith((cfg.home / "artifacts").as_uri())
    assert list((cfg.home / "artifacts").glob("models/*/artifacts/model.onnx"))


def test_down_stops_the_no_s3_stack(no_s3_stack: StackConfig) -> None:
    # setup
    records = [
        stack_proc.Record.load(stack_proc.record_path(no_s3_stack.run_dir, n))
        for n in stack.SERVICES
    ]
    pids = [r.pid for r in records if r is not None]
    # execute
    outcome = stack.stop_stack(no_s3_stack, grace_s=30)
    # assert
    assert len(pids) == 3
    assert outcome["s3"] == "not running"
    assert all(
        outcome[n] in {"stopped", "killed after 30 s"} for n in ("mlflow", "prefect", "worker")
    )
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    ports = (no_s3_stack.prefect_port, no_s3_stack.mlflow_port)
    assert not any(stack_proc.port_in_use("127.0.0.1", p) for p in ports)
    assert list(no_s3_stack.run_dir.glob("*.json")) == []
