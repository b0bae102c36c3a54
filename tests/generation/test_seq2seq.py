"""Export of encoder-decoders and bladeflow's ONNX Runtime decoder loop, against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.errors import DataError, ModelFileError, UserInputError
from bladeflow.core.generation import SPEC_FILE, Generator
from bladeflow.tasks.convert.seq2seq_export import export, same_tokens, source_generate, verify
from tests.generation import tiny_models as tm
from tests.generation.conftest import Trained

pytestmark = pytest.mark.torch
NEW = 10


def _torch(inputs: dict[str, np.ndarray]) -> dict[str, object]:
    import torch

    return {k: torch.from_numpy(v) for k, v in inputs.items()}


def _reference(t: Trained, inputs: dict[str, np.ndarray], **kwargs: object) -> np.ndarray:
    import torch

    with torch.no_grad():
        out: np.ndarray = source_generate(t.model, _torch(inputs), **kwargs).numpy()
    return out


def _assert_rows_equal(ours: np.ndarray, ref: np.ndarray, eos: int) -> None:
    bad = [i for i in range(len(ref)) if not same_tokens(ours[i], ref[i], eos)]
    assert not bad, f"rows {bad} differ:\nours {ours[bad]}\nref  {ref[bad]}"


def test_export_writes_graphs_and_description(trained: Trained) -> None:
    # setup / execute
    spec = json.loads((trained.folder / SPEC_FILE).read_text())
    # assert
    assert (trained.folder / "encoder.onnx").is_file()
    assert (trained.folder / "decoder_with_past.onnx").is_file()
    assert spec["num_layers"] == 2 and spec["num_heads"] == 4 and spec["head_dim"] == 8
    assert (spec["eos_token_id"], spec["decoder_start_token_id"]) == (tm.EOS, tm.BOS)


def test_teacher_forced_logits_and_greedy_match_source(trained: Trained) -> None:
    # setup
    gen = Generator(trained.folder)
    # execute
    result = verify(trained.model, gen, trained.inputs, max_new_tokens=NEW)
    # assert
    assert len(result.step_max_abs) >= 4
    assert result.max_abs < 1e-4, result.step_max_abs
    assert all(result.greedy_equal), result.greedy_equal


def test_trained_model_has_real_margins(trained: Trained) -> None:
    # setup: agreement is only meaningful when the top two logits are well apart
    gen = Generator(trained.folder)
    tokens = gen.generate(trained.inputs, max_new_tokens=NEW)
    # execute
    logits = gen.teacher_forced_logits(trained.inputs, tokens)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    # assert
    assert np.median(top2[..., 1] - top2[..., 0]) > 1.0


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_source(trained: Trained, length_penalty: float) -> None:
    # setup
    gen = Generator(trained.folder)
    ref = _reference(
        trained, trained.inputs, max_new_tokens=NEW, num_beams=3, length_penalty=length_penalty
    )
    # execute
    ours = gen.generate(
        trained.inputs, max_new_tokens=NEW, num_beams=3, length_penalty=length_penalty
    )
    # assert
    _assert_rows_equal(ours, ref, tm.EOS)


def test_batch_rows_stop_independently(bart: Trained) -> None:
    # setup: lengths 2..8 so rows reach EOS at different steps
    seqs = [[5] * 2, [6, 7, 8, 9, 10, 11, 12, 13], [4, 9, 3], [14, 3, 5, 7, 9]]
    gen = Generator(bart.folder)
    # execute
    batched = gen.generate(bart.batch(seqs), max_new_tokens=12)
    alone = [gen.generate(bart.batch([s]), max_new_tokens=12)[0] for s in seqs]
    # assert
    ends = [int(np.flatnonzero(row == tm.EOS)[0]) for row in batched]
    assert len(set(ends)) > 1, "every row stopped at the same step; the test proves nothing"
    for row, single, end in zip(batched, alone, ends, strict=True):
        assert same_tokens(row, single, tm.EOS)
        assert (row[end + 1 :] == tm.PAD).all()
    assert batched.shape[1] == max(ends) + 1  # the loop stops once every row is done


def test_min_and_max_new_tokens(bart: Trained) -> None:
    # setup
    gen = Generator(bart.folder)
    short = [[5, 6, 7]] * 2
    inputs = bart.batch(short)
    # execute
    ours = gen.generate(inputs, max_new_tokens=9, min_new_tokens=7)
    ref = _reference(bart, inputs, max_new_tokens=9, min_new_tokens=7)
    capped = gen.generate(inputs, max_new_tokens=2)
    # assert
    assert tm.EOS not in ours[:, 1:8]
    _assert_rows_equal(ours, ref, tm.EOS)
    assert capped.shape == (2, 3)


def test_io_binding_gives_the_same_tokens(bart: Trained) -> None:
    # setup
    plain, bound = Generator(bart.folder), Generator(bart.folder, io_binding=True)
    # execute / assert
    np.testing.assert_array_equal(
        plain.generate(bart.inputs, max_new_tokens=NEW),
        bound.generate(bart.inputs, max_new_tokens=NEW),
    )


def test_bad_arguments_are_refused(bart: Trained) -> None:
    gen = Generator(bart.folder)
    with pytest.raises(DataError, match="input_ids"):
        gen.generate({"attention_mask": bart.inputs["attention_mask"]})
    with pytest.raises(UserInputError, match="min_new_tokens"):
        gen.generate(bart.inputs, max_new_tokens=2, min_new_tokens=3)


def test_folder_without_tokenizer_is_a_clear_error(bart: Trained, tmp_path: Path) -> None:
    # setup: a valid seq2seq checkpoint, saved without its tokenizer
    bart.model.save_pretrained(tmp_path / "model")
    # execute / assert
    with pytest.raises(ModelFileError, match="no tokenizer"):
        export(tmp_path / "model", tmp_path / "out")


def test_folder_missing_export_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"encoder\.onnx"):
        Generator(tmp_path)
