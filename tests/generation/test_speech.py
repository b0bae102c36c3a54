"""A Whisper-type folder (features in, text out) through convert, the optimize flow (gate with
WER/CER against labels, generate benchmark with its breakdown, registration) and serving."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bladeflow.core.errors import ModelFileError
from bladeflow.core.settings import Settings
from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source, detect
from tests.generation import tiny_models as tm
from tests.generation.conftest import Trained, Zoo

pytestmark = pytest.mark.torch
FRAMES = 2 * tm.SOURCE_POSITIONS


def test_speech_folder_converts_with_fixed_features_and_tokenizer(
    speech_folder: Path, tmp_path: Path
) -> None:
    # execute
    art = convert_source(str(speech_folder), tmp_path / "out", ConvertOptions())
    # assert: features of the exported size in, both processor parts kept, verified
    out = Path(art.path).parent
    assert detect(str(speech_folder)) == "seq2seq"
    assert [(i.name, i.shape) for i in art.signature.inputs] == [
        ("input_features", ["batch", tm.MEL, FRAMES])
    ]
    assert (out / "tokenizer" / "preprocessor_config.json").is_file()
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    spec = json.loads((out / "seq2seq.json").read_text())
    assert spec["kind"] == "speech" and spec["extra"] == {"num_mel_bins": tm.MEL, "frames": FRAMES}
    check = art.provenance.step.config["verification"] if art.provenance.step else {}
    assert check["greedy_match_rate"] == 1.0 and check["teacher_forced_max_abs"] < 1e-3


def test_speech_folder_without_tokenizer_is_refused(speech_folder: Path, tmp_path: Path) -> None:
    # setup: the feature extractor is there, the tokenizer (ids -> text) is not
    folder = tmp_path / "no-tok"
    shutil.copytree(speech_folder, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    # execute / assert
    with pytest.raises(ModelFileError, match=r"tokenizer \(tokenizer\.json\)"):
        convert_source(str(folder), tmp_path / "out", ConvertOptions())


def test_step_times_cover_encoder_and_every_step(trained: Trained) -> None:
    # setup
    from bladeflow.core.generation import Generator

    gen = Generator(trained.folder)
    # execute
    times = gen.step_times(trained.inputs, new_tokens=6)
    # assert: EOS suppressed, so exactly 6 steps even where the model would stop earlier
    assert len(times.steps_s) == 6 and times.encoder_s > 0
    assert all(t > 0 for t in times.steps_s)


def test_optimize_speech_registers_and_serve_answers_features(
    prefect_harness: None,
    settings: Settings,
    speech_folder: Path,
    zoo: Zoo,
    tmp_path: Path,
) -> None:
    # setup: 12 utterances with their transcripts
    from mlflow import MlflowClient
    from starlette.testclient import TestClient

    from bladeflow.core.params import BenchParams, OptimizeParams
    from bladeflow.flows.optimize import optimize_flow
    from bladeflow.serving.model import ServeOptions
    from bladeflow.serving.server import ServerConfig, make_app

    data = tmp_path / "feats.npz"
    tm.write_features(data, 12, seed=3)
    params = OptimizeParams(
        source=str(speech_folder),
        name="tiny-whisper",
        data=str(data),
        batch_sizes=[1],
        bench=BenchParams(warmup=0, rounds=3, iterations=1),
        tracking_uri=settings.tracking_uri,
    )
    # execute
    result = optimize_flow(params)
    # assert: registered; the gate's numbers, WER/CER against the labels, the breakdown
    assert result.version == "1" and result.candidate in ("fp32", "int8-decoder")
    assert result.accuracy["token_ids"].samples == 12
    assert result.latency_ms["chosen"][1].p50_ms > 0 and 1 in result.speedup
    client = MlflowClient(settings.tracking_uri, settings.registry_uri)
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["generation.fp32.exact_match_rate"] == 1.0
    assert metrics["generation.fp32.wer"] == metrics["generation.fp32.source_wer"]
    assert metrics["generation.fp32.source_wer"] < 0.3  # the trained model transcribes
    assert 0 <= metrics["generation.fp32.cer"] <= metrics["generation.fp32.wer"] + 1e-9
    b1 = "generation.breakdown.fp32.b1"
    assert metrics[f"{b1}.encoder_ms"] > 0 and metrics[f"{b1}.per_token_ms"] > 0
    assert 0 < metrics[f"{b1}.bound_ms"] < metrics[f"{b1}.per_token_ms"]  # tiny: not bw-bound
    assert metrics["generation.breakdown.source.b1.per_token_ms"] > 0

    # setup: serve the version as champion
    client.set_registered_model_alias("tiny-whisper", "champion", "1")
    app = make_app(
        settings,
        ["tiny-whisper"],
        ServeOptions(max_batch_size=4, intra_op_threads=1),
        ServerConfig(poll_interval_s=3600),
    )
    seqs = [[5, 6, 7], [3, 9, 4, 12, 8]]
    feats = tm.speech_batch(seqs, np.random.default_rng(21))["input_features"]
    whisper = zoo.get("whisper")
    ref = _source_tokens(whisper.model, feats)
    expected = tm.word_tokenizer().batch_decode(ref.tolist(), skip_special_tokens=True)

    def infer(c: TestClient, x: np.ndarray, dtype: str = "FP32") -> Any:
        inp = {"name": "input_features", "shape": list(x.shape), "datatype": dtype}
        return c.post(
            "/v2/models/tiny-whisper/infer",
            json={"inputs": [{**inp, "data": x.ravel().tolist()}]},
        )

    # execute
    with TestClient(app) as c:
        deadline = time.monotonic() + 180
        while c.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        meta = c.get("/v2/models/tiny-whisper").json()
        full = infer(c, feats)
        wrong_frames = infer(c, feats[:, :, : FRAMES // 2])
        text_in = c.post(
            "/v2/models/tiny-whisper/infer",
            json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
        )
    # assert: features in; decoded text, ids and lengths out, as the source generates them
    assert meta["inputs"] == [
        {"name": "input_features", "datatype": "FP32", "shape": [-1, tm.MEL, FRAMES]}
    ]
    assert [o["name"] for o in meta["outputs"]] == ["text", "token_ids", "lengths"]
    assert full.status_code == 200, full.text
    outs = {o["name"]: o for o in full.json()["outputs"]}
    assert outs["text"]["datatype"] == "BYTES" and outs["text"]["data"] == expected
    assert outs["text"]["data"] == tm.texts_for(seqs)  # and it is the right transcript
    ids = np.array(outs["token_ids"]["data"]).reshape(outs["token_ids"]["shape"])
    for row, n, want in zip(ids, outs["lengths"]["data"], ref, strict=True):
        assert row[:n].tolist() == _until_eos(want)
    assert wrong_frames.status_code == 400
    assert str(FRAMES) in wrong_frames.text
    assert text_in.status_code == 400 and "input_features" in text_in.text


def _source_tokens(model: object, feats: np.ndarray) -> np.ndarray:
    import torch

    from bladeflow.tasks.convert.seq2seq_export import source_generate

    with torch.no_grad():
        out = source_generate(model, {"input_features": torch.from_numpy(feats)}, max_new_tokens=10)
    tokens: np.ndarray = out.numpy()[:, 1:]
    return tokens


def _until_eos(tokens: np.ndarray) -> list[int]:
    hits = np.flatnonzero(tokens == tm.EOS)
    return tokens[: hits[0] + 1].tolist() if len(hits) else tokens.tolist()
