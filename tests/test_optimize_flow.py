"""The optimize flow end to end: real Prefect (test harness), real MLflow (SQLite), real ORT."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from bladeflow.core import registry
from bladeflow.core.errors import AccuracyGateError
from bladeflow.core.params import OptimizeParams
from bladeflow.core.settings import Settings
from bladeflow.flows.optimize import optimize_flow
from tests import models

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _client(settings: Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)


def test_flow_registers_the_chosen_model_with_schema_tags(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
):
    # setup
    src = models.mlp(tmp_path / "mlp.onnx", features=8)
    data = tmp_path / "val.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    params = OptimizeParams(
        source=str(src), name="mlp-test", data=str(data), batch_sizes=[1, 4], bench=bench_fast
    )
    # execute
    result = optimize_flow(params)
    # assert: the result
    assert result.version == "1" and result.model_uri == "models:/mlp-test/1"
    assert set(result.latency_ms) == {"source", "chosen"}
    assert set(result.latency_ms["chosen"]) == {1, 4} and set(result.speedup) == {1, 4}
    assert result.accuracy["y"].max_abs_error < 1e-4 and not result.synthetic_data
    assert [s.stage for s in result.stages] == [
        "convert",
        "prepare-data",
        "optimize",
        "validate",
        "benchmark",
        "register",
    ]
    assert all(s.status == "OK" for s in result.stages)
    # assert: the registry
    c = _client(settings)
    mv = c.get_model_version("mlp-test", "1")
    assert mv.tags[registry.TAG_VALIDATED] == "true"
    assert mv.tags[registry.TAG_SOURCE] == str(src.resolve())
    assert len(mv.tags[registry.TAG_SOURCE_SHA256]) == 64
    assert mv.tags[registry.TAG_BASELINE] == "onnxruntime (default session)"
    recipe = json.loads(mv.tags[registry.TAG_RECIPE])
    assert recipe[0]["name"] == "convert.onnx" and recipe[-1]["name"] == registry.RUNTIME_STEP
    hw = json.loads(mv.tags[registry.TAG_HARDWARE])
    assert hw["threads"] >= 1 and "isa" in hw
    assert str(c.get_model_version_by_alias("mlp-test", registry.ALIAS_CANDIDATE).version) == "1"
    assert "Latency" in mv.description
    # assert: the MLflow run and the model load back and compute the same thing
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["name"] == "mlp-test"
    assert any(k.startswith("latency.source.b1.") for k in run.data.metrics)
    arts = {a.path for a in c.list_artifacts(result.run_id, "reports")}
    assert {
        "reports/summary.md",
        "reports/accuracy.json",
        "reports/benchmark.json",
        "reports/pareto.png",
        "reports/report",
        "reports/gx",
    } <= arts
    report = {a.path for a in c.list_artifacts(result.run_id, "reports/report")}
    assert {"reports/report/report.md", "reports/report/report.html"} <= report
    gx = {a.path for a in c.list_artifacts(result.run_id, "reports/gx")}
    assert "reports/gx/validation-data.json" in gx and any("accuracy-" in p for p in gx)
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id,
        artifact_path="reports/report/report.md",
        tracking_uri=settings.tracking_uri,
    )
    text = Path(local).read_text()
    assert "Latency" in text and f"{result.latency_ms['chosen'][1].p50_ms:.3f}" in text
    # the benchmark timed every candidate at the objective's batch size, and only the chosen one
    # beside the baseline (and the source) at the others: no choice depends on the rest there
    bench = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=result.run_id,
                artifact_path="reports/benchmark.json",
                tracking_uri=settings.tracking_uri,
            )
        ).read_text()
    )["models"]
    assert len(bench) > 3 and all("1" in per for per in bench.values())
    full = {name for name, per in bench.items() if set(per) == {"1", "4"}}
    assert full == {"source", "baseline", result.candidate}
    children = c.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert {r.data.tags["bladeflow.candidate"] for r in children} >= {"baseline", result.candidate}
    mlflow.set_tracking_uri(settings.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model("models:/mlp-test@candidate")
    x = np.ones((2, 8), np.float32)
    out = pyfunc.predict({"x": x})
    import onnxruntime as ort

    expected = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(out["y"]), expected, rtol=1e-5, atol=1e-5)


def test_second_run_registers_a_new_version_and_moves_the_alias(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
):
    src = models.token_model(tmp_path / "tok.onnx")
    for _ in range(2):
        result = optimize_flow(
            OptimizeParams(
                source=str(src),
                name="tok",
                batch_sizes=[2],
                passes="ort_graph:level=extended",
                bench=bench_fast,
            )
        )
    assert result.version == "2" and result.synthetic_data
    c = _client(settings)
    assert str(c.get_model_version_by_alias("tok", "candidate").version) == "2"
    assert c.get_model_version("tok", "2").tags[registry.TAG_SYNTHETIC] == "true"


@pytest.mark.torch
def test_gate_failure_registers_nothing_and_records_why(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
):
    # setup: the export verifies on small synthetic inputs, but the user's data takes the branch
    # the tracer never saw, so even the unoptimized ONNX model disagrees with the source
    data = tmp_path / "large.npz"
    np.savez(data, x=np.full((8, 4), 10.0, np.float32))
    params = OptimizeParams(
        source="tests.models:traced_branch_model", name="branchy", data=str(data), bench=bench_fast
    )
    # execute
    with pytest.raises(AccuracyGateError) as info:
        optimize_flow(params)
    # assert
    err = info.value
    assert "baseline" in err.reasons and err.run_id
    c = _client(settings)
    assert c.search_registered_models(filter_string="name='branchy'") == []
    run = c.get_run(err.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["bladeflow.outcome"] == "accuracy_gate_failed"
    assert "samples outside tolerance" in run.data.tags["bladeflow.reason"]


def test_intolerant_gate_falls_back_to_the_exact_model(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
):
    # setup: a gate no rewritten graph can meet; the unoptimized model still meets it exactly
    src = models.mlp(tmp_path / "strict.onnx", features=8)
    params = OptimizeParams(
        source=str(src),
        name="strict",
        passes="int8_dynamic",
        tolerance={"atol": 1e-9, "rtol": 0.0, "min_cosine": 0.999},
        bench=bench_fast,
    )
    # execute
    result = optimize_flow(params)
    # assert
    assert result.candidate == "baseline" and result.recipe == []
    assert result.accuracy["y"].max_abs_error == 0.0
    mv = _client(settings).get_model_version("strict", result.version)
    assert mv.tags[registry.TAG_CANDIDATE] == "baseline"


def test_a_twin_under_other_thread_settings_inherits_the_verdict_once_checked(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
):
    # setup: two recipes producing the same graph, one run with other thread settings
    src = models.mlp(tmp_path / "mlp.onnx", features=8)
    data = tmp_path / "val.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32))
    params = OptimizeParams(
        source=str(src),
        name="mlp-twins",
        data=str(data),
        batch_sizes=[1],
        bench=bench_fast,
        passes="ort_graph:level=all,ort_graph:level=all+session:threads=1;spinning=false",
    )
    # execute
    result = optimize_flow(params)
    # assert: the twin was not validated again; its outputs were compared bitwise on a probe
    c = _client(settings)
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="reports/accuracy.json", tracking_uri=c.tracking_uri
    )
    reports = json.loads(Path(local).read_text())
    twin = reports["ort_graph-levelall_session-threads1-spinningfalse"]
    assert twin["passed"] and "same graph as ort_graph-levelall" in twin["reason"]
    assert "bitwise equal on 48 samples" in twin["reason"]
    assert (
        "reason" not in reports["ort_graph-levelall"] or not reports["ort_graph-levelall"]["reason"]
    )
