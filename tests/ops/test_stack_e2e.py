"""The whole stack as `bladeflow up` starts it: real SeaweedFS, MLflow server, Prefect server and a
process worker on free loopback ports; runs are triggered through the REST API as the UI does.

Runs in subprocesses with their own PREFECT_HOME / PREFECT_API_URL, so it never touches the
session's in-process Prefect test harness.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import typer
from mlflow import MlflowClient
from typer.testing import CliRunner

from bladeflow.app import stack, stack_cli, stack_proc
from bladeflow.app.stack import StackConfig
from bladeflow.flows.nightly import MODEL_TAG_NIGHTLY
from tests import models

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    home = tmp_path_factory.mktemp("stack")
    cfg = StackConfig(
        home=home,
        prefect_port=stack_proc.free_port(),
        mlflow_port=stack_proc.free_port(),
        s3_port=stack_proc.free_port_block(8),
        timeout_s=240,
    )
    # Flow runs inherit the worker's environment: fail fast when MLflow is gone.
    saved = dict(os.environ)
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        timings = stack.start_stack(cfg)
        print(f"stack start-up seconds: {timings}")
        yield cfg
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stack.stop_stack(cfg, grace_s=5)


def _api(cfg: StackConfig, method: str, path: str, body: Any = None) -> Any:
    # Prefect on SQLite answers 503 (Retry-After) while its database is busy; its own client
    # retries those, and so do we.
    for _ in range(6):
        resp = httpx.request(method, cfg.prefect_api + path, json=body, timeout=30)
        if resp.status_code not in (429, 503):
            break
        time.sleep(float(resp.headers.get("Retry-After", 2)))
    resp.raise_for_status()
    return resp.json()


def _run_deployment(cfg: StackConfig, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """What the UI's "Run" button does: create a flow run of the deployment, then wait for it."""
    dep = _api(cfg, "GET", f"/deployments/name/{name}")
    run = _api(cfg, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        fr = _api(cfg, "GET", f"/flow_runs/{run['id']}")
        if fr["state"]["type"] in TERMINAL:
            return dict(fr)
        time.sleep(2)
    raise AssertionError(f"flow run {run['id']} of {name} did not finish in 400 s")


def _artifacts(cfg: StackConfig, flow_run_id: str) -> list[dict[str, Any]]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    return list(_api(cfg, "POST", "/artifacts/filter", body))


def _bench() -> dict[str, int]:
    return {"warmup": 1, "rounds": 2, "iterations": 3}


def test_status_reports_every_service_healthy(live_stack: StackConfig):
    # setup
    app = typer.Typer()
    app.command()(stack_cli.up)
    args = ["--status", "--home", str(live_stack.home)]
    args += ["--prefect-port", str(live_stack.prefect_port), "--mlflow-port"]
    args += [str(live_stack.mlflow_port), "--s3-port", str(live_stack.s3_port)]
    # execute
    out = CliRunner().invoke(app, args)
    # assert
    assert out.exit_code == 0, out.output
    for name in ("s3", "mlflow", "prefect", "worker"):
        assert any(line.split()[:2] == [name, "healthy"] for line in out.output.splitlines())
    deps = {d["name"] for d in _api(live_stack, "POST", "/deployments/filter", {})}
    assert {"optimize", "nightly-reoptimize"} <= deps
    nightly = _api(live_stack, "GET", "/deployments/name/nightly-reoptimize/nightly-reoptimize")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    optimize = _api(live_stack, "GET", "/deployments/name/optimize/optimize")
    assert "OptimizeParams" in optimize["parameter_openapi_schema"]["definitions"]


def test_optimize_deployment_run_from_the_api_registers_with_artifacts_in_s3(
    live_stack: StackConfig, tmp_path: Path
):
    # setup
    src = models.mlp(live_stack.home / "sources" / "mlp.onnx")
    params = {"source": str(src), "name": "mlp-live", "batch_sizes": [1], "bench": _bench()}
    params["passes"] = "ort_graph:level=all"
    # execute
    run = _run_deployment(live_stack, "optimize/optimize", {"params": params})
    # assert
    assert run["state"]["type"] == "COMPLETED", run["state"].get("message")
    c = MlflowClient(live_stack.mlflow_url, live_stack.mlflow_url)
    mv = c.get_model_version_by_alias("mlp-live", "candidate")
    assert str(mv.version) == "1" and mv.tags["bladeflow.validated"] == "true"
    env = stack.service_env(live_stack)
    s3 = boto3.client(
        "s3",
        endpoint_url=live_stack.s3_url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=live_stack.bucket)["Contents"]]
    assert any(k.endswith("artifacts/model.onnx") for k in keys)


def test_nightly_deployment_second_run_skips(live_stack: StackConfig):
    # setup: the model registered by the previous test, opted in
    c = MlflowClient(live_stack.mlflow_url, live_stack.mlflow_url)
    c.set_registered_model_tag("mlp-live", MODEL_TAG_NIGHTLY, "true")
    params = {"params": {"min_speedup": 1000.0, "bench": _bench()}}
    # execute
    first = _run_deployment(live_stack, "nightly-reoptimize/nightly-reoptimize", params)
    second = _run_deployment(live_stack, "nightly-reoptimize/nightly-reoptimize", params)
    # assert
    assert first["state"]["type"] == second["state"]["type"] == "COMPLETED"
    first_md = _artifacts(live_stack, first["id"])[0]["data"]
    second_md = _artifacts(live_stack, second["id"])[0]["data"]
    assert "| mlp-live | not_improved |" in first_md
    assert "| mlp-live | skipped |" in second_md and "nothing changed" in second_md
    assert [str(v.version) for v in c.search_model_versions("name='mlp-live'")] == ["1"]


def test_benchmark_runs_on_the_work_pool_the_parameter_names(live_stack: StackConfig):
    # setup: a second pool ("the GPU machines") with its own worker, and a pool nobody polls
    env = stack.service_env(live_stack)
    deploy = [
        sys.executable,
        "-m",
        "bladeflow.flows.deployments",
        "--work-pool",
        live_stack.work_pool,
    ]
    deploy += ["--target-pool", "gpu-sim", "--target-pool", "nobody"]
    subprocess.run(deploy, env=env, check=True, capture_output=True, timeout=300)
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu-sim"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    src = models.mlp(live_stack.home / "sources" / "mlp-pool.onnx", seed=5)
    params = {"source": str(src), "name": "mlp-pool", "batch_sizes": [1], "bench": _bench()}
    params["passes"] = "ort_graph:level=all"
    try:
        # execute: the optimize flow on the default pool, its benchmark on gpu-sim
        on_gpu = {**params, "benchmark_work_pool": "gpu-sim"}
        run = _run_deployment(live_stack, "optimize/optimize", {"params": on_gpu})
        stranded = _run_deployment(
            live_stack,
            "optimize/optimize",
            {
                "params": {
                    **params,
                    "name": "mlp-nobody",
                    "benchmark_work_pool": "nobody",
                    "benchmark_timeout_s": 20,
                }
            },
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    # assert: registered, timed by a flow run of benchmark-on-gpu-sim on the gpu-sim pool
    assert run["state"]["type"] == "COMPLETED", run["state"].get("message")
    c = MlflowClient(live_stack.mlflow_url, live_stack.mlflow_url)
    mv = c.get_model_version_by_alias("mlp-pool", "candidate")
    assert c.get_run(mv.run_id).data.tags["bladeflow.benchmark_pool"] == "gpu-sim"
    body = {"flow_runs": {"parent_task_run_id": {"is_null_": False}}}
    children = [
        fr
        for fr in _api(live_stack, "POST", "/flow_runs/filter", body)
        if fr.get("work_pool_name") in ("gpu-sim", "nobody")
    ]
    by_pool = {fr["work_pool_name"]: fr["state"]["type"] for fr in children}
    assert by_pool == {"gpu-sim": "COMPLETED", "nobody": "CANCELLED"}, by_pool
    # assert: no worker on the pool -> a clear failure after the timeout, nothing registered
    assert stranded["state"]["type"] == "FAILED"
    assert "prefect worker start --pool nobody" in stranded["state"]["message"]
    assert not c.search_model_versions("name='mlp-nobody'")


def test_stopped_mlflow_fails_the_run_clearly_and_registers_nothing(live_stack: StackConfig):
    # setup
    assert stack_proc.stop(live_stack.run_dir, "mlflow", grace_s=10) == "stopped"
    src = models.mlp(live_stack.home / "sources" / "mlp2.onnx", seed=3)
    params = {"source": str(src), "name": "mlp-halfway", "batch_sizes": [1], "bench": _bench()}
    # execute
    run = _run_deployment(live_stack, "optimize/optimize", {"params": params})
    # assert: failed, and the message says what to check
    assert run["state"]["type"] == "FAILED"
    assert f"cannot use MLflow at {live_stack.mlflow_url}" in run["state"]["message"]
    db = f"sqlite:///{live_stack.run_dir / 'mlflow.db'}"
    local = MlflowClient(db, db)
    assert "mlp-halfway" not in [m.name for m in local.search_registered_models()]


def test_down_stops_every_process_it_started(live_stack: StackConfig):
    # setup
    records = [
        stack_proc.Record.load(stack_proc.record_path(live_stack.run_dir, n))
        for n in stack.SERVICES
    ]
    pids = [r.pid for r in records if r is not None]
    # execute
    outcome = stack.stop_stack(live_stack, grace_s=30)
    # assert
    assert len(pids) == 3  # mlflow was stopped by the previous test
    assert outcome["mlflow"].startswith("not running")
    assert all(outcome[n] in {"stopped", "killed after 30 s"} for n in ("s3", "prefect", "worker"))
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not any(stack_proc.port_in_use("127.0.0.1", p) for p in (live_stack.prefect_port,))
    assert list(live_stack.run_dir.glob("*.json")) == []
