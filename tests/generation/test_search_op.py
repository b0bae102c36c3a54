"""ONNX Runtime's contrib BeamSearch op wrapping bladeflow's exported encoder and decoder: built
from the graphs, it reproduces transformers' generate() (greedy and beam) on the trained tiny
BART; its GreedySearch op refuses encoder-decoders; speech models are refused by the builder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import SessionConfig
from bladeflow.core.errors import ModelFileError
from bladeflow.core.generation import Generator
from bladeflow.core.search_op import SEARCH_FILE, SearchOpGenerator, _after_eos_pad
from bladeflow.tasks.benchmark import generation as gb
from bladeflow.tasks.convert.seq2seq_export import same_tokens, source_generate
from bladeflow.tasks.optimize.search_op import GREEDY_SEARCH, build_search_model
from tests.generation import tiny_models as tm
from tests.generation.conftest import Trained

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def op_folder(bart: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("search-op") / "bart"
    shutil.copytree(bart.folder, folder)
    build_search_model(folder, folder / SEARCH_FILE)
    return folder


def _source(bart: Trained, inputs: dict[str, np.ndarray], **search: object) -> np.ndarray:
    import torch

    feeds = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out: np.ndarray = source_generate(bart.model, feeds, **search).numpy()
    return out


@pytest.mark.parametrize("beams", [1, 3])
def test_search_op_reproduces_generate(bart: Trained, op_folder: Path, beams: int) -> None:
    # setup: a batch whose rows stop at different steps (EOS), plus one cut at max_new_tokens
    op = SearchOpGenerator(op_folder / SEARCH_FILE, Generator(op_folder).spec, SessionConfig())
    search = {"max_new_tokens": 10, "num_beams": beams}
    short = {"max_new_tokens": 3, "num_beams": beams}
    # execute
    out, ref = op.generate(bart.inputs, **search), _source(bart, bart.inputs, **search)
    cut, ref_cut = op.generate(bart.inputs, **short), _source(bart, bart.inputs, **short)
    # assert: token for token, EOS included, rows padded after it
    assert [same_tokens(a, b, tm.EOS) for a, b in zip(out, ref, strict=True)] == [True] * 8
    assert len({int((row == tm.EOS).argmax()) for row in out}) > 1  # rows stopped apart
    assert out[0, 0] == tm.BOS and out.shape[1] <= 11
    np.testing.assert_array_equal(cut, ref_cut)  # no EOS reached: every row 1 + 3 long


def test_search_op_min_new_tokens_and_benchmark(bart: Trained, op_folder: Path) -> None:
    # setup
    settings = gb.GenerateBench(new_tokens=6, rounds=2, warmup=0, threads=1)
    feeds = gb.rows([bart.inputs], 2)
    # execute
    tokens = gb.onnx_runner(op_folder, SessionConfig(), settings)(feeds)
    ref = _source(bart, feeds, max_new_tokens=6, min_new_tokens=6)
    parts = gb.onnx_breakdown(op_folder, SessionConfig(), feeds, settings, bandwidth_gb_s=10.0)
    # assert: min = max new tokens, as the benchmark times it, and the same tokens as the source
    assert tokens.shape == (2, 7)
    assert [same_tokens(a, b, tm.EOS) for a, b in zip(tokens, ref, strict=True)] == [True] * 2
    assert parts.how.startswith("derived from search-op") and parts.encoder_ms > 0
    assert parts.per_token_ms >= 0 and parts.bound_ms > 0


def test_greedy_search_op_refuses_encoder_decoders(bart: Trained, tmp_path: Path) -> None:
    # setup
    path = build_search_model(bart.folder, tmp_path / "greedy.onnx", GREEDY_SEARCH)
    # execute / assert: ONNX Runtime's GreedySearch kernel takes GPT-type decoders only
    with pytest.raises(ModelFileError, match="kModelTypeGpt"):
        SearchOpGenerator(path, Generator(bart.folder).spec, SessionConfig())


def test_speech_models_are_refused(zoo: object, tmp_path: Path) -> None:
    # setup
    whisper = zoo.get("whisper")  # type: ignore[attr-defined]
    # execute / assert
    with pytest.raises(ModelFileError, match="speech model"):
        build_search_model(whisper.folder, tmp_path / "search.onnx")


def test_op_rows_get_their_eos_back() -> None:
    # setup: the op stores finished hypotheses without EOS and pads with pad_token_id
    pad, eos = tm.PAD, tm.EOS
    seqs = np.array([[1, 5, 6, pad, pad], [1, 7, 8, 9, 10], [1, 4, eos, pad, pad]])
    # execute
    out = _after_eos_pad(seqs, eos, pad)
    # assert
    assert out.tolist() == [[1, 5, 6, eos, pad], [1, 7, 8, 9, 10], [1, 4, eos, pad, pad]]


def test_a_version_with_the_search_op_is_served_by_it(bart: Trained, op_folder: Path) -> None:
    from bladeflow.serving.generation import GenerationVersion

    # setup: the op candidate's folder as it is registered, and the plain one
    served = GenerationVersion("bart", "1", op_folder, SessionConfig())
    plain = GenerationVersion("bart", "2", bart.folder, SessionConfig())
    feeds = {**bart.inputs, "max_new_tokens": np.full(8, 6, np.int64)}
    feeds["num_beams"] = np.ones(8, np.int64)
    # execute
    out, ref = served.predict(dict(feeds)), plain.predict(dict(feeds))
    # assert: the op answers (the way it was validated and timed), token for token the same
    assert served.search is not None and plain.search is None
    np.testing.assert_array_equal(out["token_ids"], ref["token_ids"])
