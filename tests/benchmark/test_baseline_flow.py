"""The optimize flow states its baseline: a Keras source is timed as a traced graph (the served
path) and eagerly, and the registered version and the --json result say which is the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from bladeflow.core import registry
from bladeflow.core.params import OptimizeParams
from bladeflow.core.settings import Settings

pytestmark = pytest.mark.usefixtures("prefect_harness")


def build_mlp() -> tuple[object, dict[str, object]]:
    """A ``module:callable`` source for the PyTorch flow test."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return net, {"x": torch.zeros(2, 6)}


@pytest.mark.torch
def test_torch_flow_registers_the_inference_mode_baseline_with_threads(
    settings: Settings, bench_fast: dict[str, int]
):
    pytest.importorskip("torch")
    from bladeflow.flows.optimize import optimize_flow

    # setup
    params = OptimizeParams(
        source=f"{__name__}:build_mlp",
        name="torch-baseline",
        batch_sizes=[1],
        passes="ort_graph",
        bench=bench_fast,
    )
    # execute
    result = optimize_flow(params)
    # assert: one served path, no eager one; the tag and the JSON field agree
    doc = json.loads(result.model_dump_json())
    assert "under inference_mode" in doc["baseline"] and " thread" in doc["baseline"]
    assert doc["source_eager_ms"] == {} and doc["speedup_vs_eager"] == {}
    c = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    mv = c.get_model_version("torch-baseline", result.version)
    assert mv.tags[registry.TAG_BASELINE] == result.baseline


@pytest.mark.tf
@pytest.mark.slow  # TensorFlow import + tf2onnx conversion + the flow: over a minute on 2 cores
def test_keras_flow_registers_the_served_baseline_and_reports_eager(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    from bladeflow.flows.optimize import optimize_flow

    # setup
    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="relu")(x)
    keras.Model(x, keras.layers.Dense(3, name="y")(h)).save(tmp_path / "mlp.keras")
    data = tmp_path / "val.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32))
    params = OptimizeParams(
        source=str(tmp_path / "mlp.keras"),
        name="keras-baseline",
        data=str(data),
        batch_sizes=[1, 4],
        passes="ort_graph",
        bench=bench_fast,
    )
    # execute
    result = optimize_flow(params)
    # assert: the JSON result names the baseline and carries the eager latency
    doc = json.loads(result.model_dump_json())
    assert "tf.function (graph" in doc["baseline"] and "source-eager" in doc["baseline"]
    assert doc["source_runtime"] == doc["baseline"]
    assert set(doc["source_eager_ms"]) == {"1", "4"} and set(doc["speedup_vs_eager"]) == {"1", "4"}
    assert set(result.latency_ms) == {"source", "chosen"}
    for bs in (1, 4):  # the baseline is never slower than the eager path
        assert result.latency_ms["source"][bs].p50_ms <= result.source_eager_ms[bs].p50_ms
    # assert: the version's tag says the same, the run has both latencies
    c = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    mv = c.get_model_version("keras-baseline", result.version)
    assert mv.tags[registry.TAG_BASELINE] == result.baseline
    metrics = c.get_run(result.run_id).data.metrics
    assert "latency.source.b1.p50_ms" in metrics and "latency.source-eager.b1.p50_ms" in metrics
