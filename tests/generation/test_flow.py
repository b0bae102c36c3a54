"""A seq2seq folder through convert, the optimize flow (generation gate, generate benchmark,
registration of the folder) and serving: text in, text out."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bladeflow.core.generation import DECODER_FILE, ENCODER_FILE, SPEC_FILE
from bladeflow.core.settings import Settings
from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source, detect
from tests.generation import tiny_models as tm
from tests.generation.conftest import Trained

pytestmark = pytest.mark.torch


def _texts(path: Path, n: int, seed: int) -> list[list[int]]:
    """Texts and their targets (the reversed sequence, what the model was trained to output)."""
    seqs = tm.random_sequences(np.random.default_rng(seed), n)
    targets = tm.texts_for([s[::-1] for s in seqs])
    rows = [{"text": t, "target": r} for t, r in zip(tm.texts_for(seqs), targets, strict=True)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return seqs


def test_seq2seq_folder_converts_to_a_verified_folder(text_folder: Path, tmp_path: Path) -> None:
    # execute
    fmt = detect(str(text_folder))
    art = convert_source(str(text_folder), tmp_path / "out", ConvertOptions())
    # assert: both graphs, the description, tokenizer and generation config, verified
    out = Path(art.path).parent
    assert fmt == "seq2seq" and art.format == "seq2seq" and Path(art.path).name == SPEC_FILE
    for name in (ENCODER_FILE, DECODER_FILE, "generation_config.json", "tokenizer"):
        assert (out / name).exists(), name
    assert art.assets["tokenizer"] == str(out / "tokenizer")
    step = art.provenance.step
    assert step is not None and step.config["generation"]["max_new_tokens"] == 10
    check = step.config["verification"]
    assert check["greedy_match_rate"] == 1.0 and check["samples"] == 2
    assert 0 < check["teacher_forced_max_abs"] < 1e-3
    assert [i.name for i in art.signature.inputs] == ["input_ids", "attention_mask"]
    assert not list(out.glob(".convert-*"))  # the staging folder is gone


def test_optimize_registers_and_serve_answers_text(
    prefect_harness: None,
    settings: Settings,
    text_folder: Path,
    bart: Trained,
    tmp_path: Path,
) -> None:
    # setup
    from starlette.testclient import TestClient

    from bladeflow.core.params import BenchParams, OptimizeParams
    from bladeflow.flows.optimize import optimize_flow
    from bladeflow.serving.model import ServeOptions
    from bladeflow.serving.server import ServerConfig, make_app

    data = tmp_path / "texts.jsonl"
    _texts(data, 12, seed=3)
    params = OptimizeParams(
        source=str(text_folder),
        name="tiny-bart",
        data=str(data),
        text_columns=["text"],
        labels_column="target",
        batch_sizes=[1],
        bench=BenchParams(warmup=0, rounds=3, iterations=1),
        tracking_uri=settings.tracking_uri,
    )
    # execute
    result = optimize_flow(params)
    # assert: registered, with generate latencies and the gate's numbers
    assert result.version == "1"
    assert result.candidate in ("fp32", "int8-decoder", "ort-beam-search-op")
    assert result.accuracy["token_ids"].samples == 12
    if result.candidate != "int8-decoder":
        assert result.accuracy["token_ids"].min_cosine == 1.0  # exact sequence match rate
    assert result.latency_ms["source"][1].p50_ms > 0 and result.latency_ms["chosen"][1].p50_ms > 0
    assert 1 in result.speedup and result.source_runtime.startswith("pytorch eager generate")
    assert {s.stage for s in result.stages} >= {"convert", "validate", "benchmark", "register"}
    from mlflow import MlflowClient

    metrics = MlflowClient(settings.tracking_uri).get_run(result.run_id).data.metrics
    assert metrics["generation.fp32.chrf"] == metrics["generation.fp32.source_chrf"] > 80
    assert "generation.breakdown.fp32.b1.per_token_ms" in metrics

    # setup: serve the version as champion
    c = settings
    MlflowClient(c.tracking_uri, c.registry_uri).set_registered_model_alias(
        "tiny-bart", "champion", "1"
    )
    app = make_app(
        settings,
        ["tiny-bart"],
        ServeOptions(max_batch_size=4, intra_op_threads=1),
        ServerConfig(poll_interval_s=3600),
    )
    seqs = [[5, 6, 7], [3, 9, 4, 12, 8]]
    texts = tm.texts_for(seqs)
    ref = _source_tokens(bart, seqs)  # what transformers' generate() gives, start token dropped
    expected = tm.word_tokenizer().batch_decode(ref.tolist(), skip_special_tokens=True)

    def infer(client: TestClient, parameters: dict[str, object] | None = None) -> Any:
        body = {
            "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}],
            **({"parameters": parameters} if parameters else {}),
        }
        return client.post("/v2/models/tiny-bart/infer", json=body)

    # execute
    with TestClient(app) as client:
        deadline = time.monotonic() + 180  # the fleet loads and warms the version after start
        while client.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        full = infer(client)
        short = infer(client, {"max_new_tokens": 2, "num_beams": 2})
        too_many = infer(client, {"num_beams": 99})
    # assert: text in, text out, the source's own output
    assert full.status_code == 200, full.text
    outs = {o["name"]: o for o in full.json()["outputs"]}
    assert outs["text"]["datatype"] == "BYTES" and outs["text"]["data"] == expected
    assert outs["token_ids"]["datatype"] == "INT64" and outs["token_ids"]["shape"][0] == 2
    ids = np.array(outs["token_ids"]["data"]).reshape(outs["token_ids"]["shape"])
    for row, lengths, want in zip(ids, outs["lengths"]["data"], ref, strict=True):
        assert row[:lengths].tolist() == tm_until_eos(want)
    assert short.status_code == 200, short.text
    lengths = {o["name"]: o for o in short.json()["outputs"]}["lengths"]["data"]
    assert lengths == [2, 2]
    assert too_many.status_code == 400 and "num_beams" in too_many.text


def _source_tokens(bart: Trained, seqs: list[list[int]]) -> np.ndarray:
    import torch

    from bladeflow.tasks.convert.seq2seq_export import source_generate

    feeds = {k: torch.from_numpy(v) for k, v in tm.text_batch(seqs).items()}
    with torch.no_grad():
        out: np.ndarray = source_generate(bart.model, feeds, max_new_tokens=10).numpy()
    return out[:, 1:]


def tm_until_eos(tokens: np.ndarray) -> list[int]:
    hits = np.flatnonzero(tokens == tm.EOS)
    return tokens[: hits[0] + 1].tolist() if len(hits) else tokens.tolist()
