"""An MLflow transformers model of a trained BART-type encoder-decoder, optimized end to end by
its models:/ URI: detected as seq2seq, downloaded once, converted, gated against the source's
generate(), benchmarked and registered as a new model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.settings import Settings
from tests.generation import tiny_models as tm
from tests.generation.conftest import Trained

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_optimize_mlflow_transformers_uri(
    prefect_harness: None, settings: Settings, bart: Trained, tmp_path: Path
) -> None:
    # setup: the trained model logged with its tokenizer to the run's own registry
    import mlflow
    from mlflow import MlflowClient

    from bladeflow.core.params import BenchParams, OptimizeParams
    from bladeflow.flows.optimize import optimize_flow
    from bladeflow.tasks.convert.dispatch import detect

    bart.model.generation_config.max_new_tokens = 10
    experiment = mlflow.create_experiment("source-models", str(tmp_path / "source-artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        mlflow.transformers.log_model(
            {"model": bart.model, "tokenizer": tm.word_tokenizer()},
            name="model",
            task="text-generation",
            registered_model_name="bart-source",
            pip_requirements=[],
        )
    seqs = tm.random_sequences(np.random.default_rng(11), 10)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tm.texts_for(seqs)))
    params = OptimizeParams(
        source="models:/bart-source/1",
        name="bart-from-mlflow",
        data=str(data),
        text_columns=["text"],
        batch_sizes=[1],
        bench=BenchParams(warmup=0, rounds=2, iterations=1),
        tracking_uri=settings.tracking_uri,
    )
    # execute
    assert detect(params.source) == "seq2seq"
    result = optimize_flow(params)
    # assert: a new registered model whose fp32 candidate reproduces the source's generate()
    assert result.version == "1"
    assert result.candidate in ("fp32", "int8-decoder", "ort-beam-search-op")
    acc = result.accuracy["token_ids"]
    assert acc.samples == 10
    if result.candidate != "int8-decoder":
        assert acc.min_cosine == 1.0  # exact sequence match rate
    assert result.latency_ms["source"][1].p50_ms > 0 < result.latency_ms["chosen"][1].p50_ms
    client = MlflowClient(settings.tracking_uri, settings.registry_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["source"] == "models:/bart-source/1"
    # fp32 and ONNX Runtime's BeamSearch op over the same graphs both reproduce the source
    assert run.data.metrics["generation.fp32.exact_match_rate"] == 1.0
    assert run.data.metrics["generation.ort-beam-search-op.exact_match_rate"] == 1.0
    bench = Path(client.download_artifacts(result.run_id, "reports/benchmark.json", str(tmp_path)))
    timed = json.loads(bench.read_text())["models"]
    assert {"source", "fp32", "ort-beam-search-op"} <= set(timed)
    version = client.get_model_version("bart-from-mlflow", "1")
    local = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "v")))
    convert = json.loads((local / "convert_config.json").read_text())
    assert convert["config"]["mlflow_flavor"] == "transformers"
    assert convert["config"]["verification"]["greedy_match_rate"] == 1.0
