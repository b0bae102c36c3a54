"""Scale-out on a Dask cluster, and a clear failure (with retries) when MLflow is down."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from bladeflow.app import stack_proc
from bladeflow.core.errors import RegistryError
from bladeflow.core.params import OptimizeParams
from bladeflow.core.settings import Settings
from bladeflow.flows.deployments import with_dask
from bladeflow.flows.optimize import optimize_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_optimize_flow_fans_candidates_out_on_a_local_dask_cluster(
    settings: Settings, mlp_model: tuple[Path, Path], bench_fast: dict[str, int]
):
    # setup: two recipes besides the baseline, built and validated as parallel Dask tasks
    src, data = mlp_model
    params = OptimizeParams(
        source=str(src),
        name="mlp-dask",
        data=str(data),
        batch_sizes=[1],
        passes="ort_graph:level=all,ort_graph:level=basic",
        bench=bench_fast,
    )
    on_dask = with_dask(optimize_flow, n_workers=1, threads=2)
    # execute
    state = on_dask(params, return_state=True)
    # assert
    assert type(on_dask.task_runner).__name__ == "DaskTaskRunner"
    assert state.is_completed(), state.message
    result = state.result()
    assert result.version == "1"
    assert {s.stage for s in result.stages if s.status == "OK"} >= {"optimize", "validate"}
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    assert c.get_model_version("mlp-dask", "1").tags["bladeflow.validated"] == "true"


def test_mlflow_down_retries_then_fails_clearly_and_registers_nothing(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    mlp_model: tuple[Path, Path],
    bench_fast: dict[str, int],
):
    # setup: a tracking server URL nothing answers on (a stopped server); no client-side HTTP
    # retries, so the flow's own task retries are what is observed
    dead = f"http://127.0.0.1:{stack_proc.free_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    src, data = mlp_model
    params = OptimizeParams(
        source=str(src), name="mlp-down", data=str(data), batch_sizes=[1], tracking_uri=dead
    )
    params = OptimizeParams(
        **{**params.model_dump(), "bench": bench_fast, "passes": "ort_graph:level=all"}
    )
    # execute
    state = optimize_flow(params, return_state=True)
    # assert: failed, with a message that names the server and what to check
    assert state.is_failed()
    with pytest.raises(RegistryError, match=f"cannot use MLflow at {dead}.*server is running"):
        state.result()
    # assert: the MLflow task ran three times (two retries) before giving up
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )[0]
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    start = [
        t for t in tasks if t.task_key.startswith("start_run_task") or "start-mlflow-run" in t.name
    ]
    assert len(start) == 1 and start[0].run_count == 3
    assert start[0].state is not None and start[0].state.is_failed()
    # assert: nothing anywhere got registered (the local registry is untouched too)
    assert not [t for t in tasks if t.name.startswith("register")]
    local = MlflowClient(settings.tracking_uri, settings.registry_uri)
    assert local.search_registered_models() == []
