"""Artifacts round-trip through a real S3 server (SeaweedFS): boto3, and MLflow via the flow."""

from __future__ import annotations

from pathlib import Path

import boto3
import mlflow
import numpy as np
import onnxruntime as ort
import pytest
from mlflow import MlflowClient

from bladeflow.app.stack import StackConfig
from bladeflow.core.params import OptimizeParams
from bladeflow.core.settings import Settings
from bladeflow.flows.optimize import optimize_flow


def _s3(cfg: StackConfig) -> object:
    return boto3.client("s3", endpoint_url=cfg.s3_url, region_name="us-east-1")


def test_boto3_round_trip_on_the_local_s3_server(s3_env: StackConfig):
    # setup
    s3 = _s3(s3_env)
    body = np.random.default_rng(1).bytes(200_000)
    # execute
    s3.put_object(Bucket=s3_env.bucket, Key="probe/blob.bin", Body=body)  # type: ignore[attr-defined]
    got = s3.get_object(Bucket=s3_env.bucket, Key="probe/blob.bin")["Body"].read()  # type: ignore[attr-defined]
    # assert
    assert got == body


@pytest.mark.usefixtures("prefect_harness")
def test_optimize_flow_stores_reports_and_model_in_s3_and_loads_back(
    s3_env: StackConfig,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    mlp_model: tuple[Path, Path],
    bench_fast: dict[str, int],
):
    # setup: new experiments put their artifacts in the bucket (what `bladeflow up` exports)
    prefix = f"artifacts-{settings.home.parent.name}"
    monkeypatch.setenv("BLADEFLOW_ARTIFACT_ROOT", f"s3://{s3_env.bucket}/{prefix}")
    src, data = mlp_model
    params = OptimizeParams(
        source=str(src),
        name="mlp-s3",
        data=str(data),
        batch_sizes=[1],
        passes="ort_graph:level=all",
        bench=bench_fast,
    )
    # execute
    result = optimize_flow(params)
    # assert: the objects are in the bucket
    s3 = _s3(s3_env)
    listing = s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)  # type: ignore[attr-defined]
    keys = {o["Key"] for o in listing.get("Contents", [])}
    assert any(k.endswith(f"{result.run_id}/artifacts/reports/summary.md") for k in keys)
    assert any(k.endswith("/artifacts/model.onnx") for k in keys)
    # assert: MLflow reads them back through S3 and the model computes what the source does
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    assert c.get_run(result.run_id).info.artifact_uri.startswith(f"s3://{s3_env.bucket}/{prefix}")
    summary = mlflow.artifacts.load_text(
        f"{c.get_run(result.run_id).info.artifact_uri}/reports/summary.md"
    )
    assert "mlp-s3" in summary
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/mlp-s3@candidate")
    x = np.ones((2, 8), np.float32)
    expected = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(model.predict({"x": x})["y"]), expected, rtol=1e-5)
