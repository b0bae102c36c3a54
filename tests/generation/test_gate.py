"""The generation gate's metrics on hand-made token and logit arrays (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.errors import DataError
from bladeflow.tasks.validate.generation import (
    check_data,
    compare,
    judge,
    read_texts,
    until_eos,
)

EOS, PAD, V = 2, 0, 6


def _logits(tokens: np.ndarray) -> np.ndarray:
    """Logits whose argmax at step s is tokens[:, s + 1] (margin 5)."""
    rows, width = tokens.shape
    out = np.zeros((rows, width - 1, V), dtype=np.float32)
    for r in range(rows):
        for s in range(width - 1):
            out[r, s, tokens[r, s + 1]] = 5.0
    return out


def test_identical_outputs_match_exactly() -> None:
    # setup: the second row stops early and is padded
    ref = np.array([[1, 3, 4, 5, EOS], [1, 4, EOS, PAD, PAD]])
    # execute
    acc = compare([ref.copy()], [ref], [_logits(ref)], [_logits(ref)], EOS)
    # assert
    assert acc.samples == 2 and acc.exact_match_rate == 1.0 and acc.token_agreement == 1.0
    assert acc.first_divergence == [None, None]
    assert acc.teacher_forced_top1 == 1.0 and acc.teacher_forced_max_abs == 0.0
    assert judge("fp32", acc, reduced_precision=False).passed


def test_divergence_position_agreement_and_top1() -> None:
    # setup: row 0 differs at generated position 2 and then compounds; row 1 is equal
    ref = np.array([[1, 3, 4, 5, EOS], [1, 4, EOS, PAD, PAD]])
    cand = np.array([[1, 3, 5, 4, EOS], [1, 4, EOS, PAD, PAD]])
    cand_logits = _logits(ref)
    cand_logits[0, 1] = 0.0
    cand_logits[0, 1, 5] = 5.0  # teacher-forced: a different top-1 at step 1 only
    # execute
    acc = compare([cand], [ref], [cand_logits], [_logits(ref)], EOS)
    # assert
    assert acc.exact_match_rate == 0.5
    assert acc.first_divergence == [2, None]
    assert acc.token_agreement == 4 / 6  # row 0: 3, EOS of 4 ref tokens; row 1: 2 of 2
    assert acc.teacher_forced_top1 == 5 / 6
    assert acc.teacher_forced_max_abs == 5.0
    verdict = judge("fp32", acc, reduced_precision=False)
    assert not verdict.passed and "exact sequence match 0.500 < 0.99" in verdict.reason
    assert "[2]" in verdict.reason  # the divergence position is reported


def test_shorter_candidate_diverges_where_it_stops() -> None:
    ref = np.array([[1, 3, 4, 5, EOS]])
    cand = np.array([[1, 3, EOS, PAD, PAD]])
    acc = compare([cand], [ref], [_logits(ref)], [_logits(ref)], EOS)
    assert acc.first_divergence == [2] and acc.exact_match_rate == 0.0
    assert np.array_equal(until_eos(cand[0], EOS), [1, 3, EOS])


def test_reduced_precision_is_judged_by_agreement_not_exact_match() -> None:
    # setup: 1 token in 40 differs (the last one of one row): exact match 0.9, agreement 0.975
    ref = np.tile(np.array([[1, 3, 4, 5, EOS]]), (10, 1))
    cand = ref.copy()
    cand[0, 3] = 4
    acc = compare([cand], [ref], [_logits(ref)], [_logits(ref)], EOS)
    # execute / assert
    assert acc.exact_match_rate == 0.9
    assert not judge("fp32", acc, reduced_precision=False).passed
    assert judge("int8-decoder", acc, reduced_precision=True).passed


def test_generation_data_must_be_given_and_name_its_text_column(tmp_path: Path) -> None:
    # setup
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "a b", "note": "x"}\n{"text": "c", "note": "y"}\n')
    # execute / assert
    with pytest.raises(DataError, match="give --data"):
        check_data(None)
    with pytest.raises(DataError, match="does not exist"):
        check_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="--text-column"):
        read_texts(data, None)  # two text columns: which one?
    with pytest.raises(DataError, match="no column 'body'"):
        read_texts(data, "body")
    assert read_texts(data, "text") == ["a b", "c"]


# -- task metrics against labels ---------------------------------------------------------------


def test_chrf_matches_sacrebleu_published_scores() -> None:
    # sacreBLEU CHRF() on the examples of the Hugging Face chrF metric card
    from bladeflow.tasks.validate.text_metrics import chrf

    one = chrf(
        ["The ties between Obama and Netanyahu are not particularly friendly."],
        ["The relationship between Obama and Netanyahu is not exactly friendly."],
    )
    two = chrf(
        [
            "The relationship between dogs and cats is not exactly friendly.",
            "A good bookshop is just a genteel Black Hole that knows how to read.",
        ],
        [
            "The relationship between cats and dogs is not exactly friendly.",
            "a good bookshop is just a genteel black hole that knows how to read.",
        ],
    )
    assert one == pytest.approx(61.576379378113785, abs=1e-9)
    assert two == pytest.approx(84.64214891738334, abs=1e-9)
    assert chrf(["same text"], ["same text"]) == pytest.approx(100.0)


def test_wer_and_cer_are_corpus_edit_rates() -> None:
    from bladeflow.tasks.validate.text_metrics import cer, wer

    # one substitution and one deletion in 4 + 2 reference words
    assert wer(["a b c d", "e f"], ["a x c", "e f"]) == pytest.approx(2 / 6)
    assert cer(["abcd"], ["abd"]) == pytest.approx(1 / 4)
    assert wer(["a b"], ["a b"]) == 0.0
    with pytest.raises(ValueError, match="2 references but 1"):
        wer(["a", "b"], ["a"])


def test_metric_drop_gates_every_candidate_when_set() -> None:
    # setup: same tokens as the source, but the candidate's decoded text scores worse
    from bladeflow.tasks.validate.generation import GenerationPolicy

    ref = np.array([[1, 3, 4, EOS]])
    base = compare([ref], [ref], [_logits(ref)], [_logits(ref)], EOS)
    acc = base.model_copy(update={"task": {"wer": 0.25}, "source_task": {"wer": 0.2}})
    # execute
    lenient = judge("fp32", acc, False, GenerationPolicy(max_metric_drop=0.1))
    strict = judge("fp32", acc, False, GenerationPolicy(max_metric_drop=0.01))
    # assert
    assert acc.metric_drops() == {"wer": pytest.approx(0.05)}
    assert acc.metrics()["source_wer"] == 0.2 and acc.metrics()["wer_drop"] == pytest.approx(0.05)
    assert lenient.passed and "wer 0.25 (source 0.2)" in lenient.reason
    assert not strict.passed and "worse by 0.0500 > metric_drop 0.01" in strict.reason
    assert judge("fp32", acc, False).passed  # no limit: reported only


def test_references_come_from_the_npz_or_the_labels_column(tmp_path: Path) -> None:
    from bladeflow.tasks.validate.generation import load_references, read_table

    # setup
    feats = np.zeros((2, 3, 4), dtype=np.float32)
    good, bad, none = tmp_path / "good.npz", tmp_path / "bad.npz", tmp_path / "none.npz"
    np.savez(good, input_features=feats, labels=np.array(["a b", "c"]))
    np.savez(bad, input_features=feats, labels=np.array([1, 2]))
    np.savez(none, input_features=feats)
    table = tmp_path / "texts.jsonl"
    table.write_text('{"text": "x y", "ref": "y x"}\n{"text": " ", "ref": "-"}\n{"text": "z"}\n')
    # execute / assert
    assert load_references(str(good), "speech") == ["a b", "c"]
    assert load_references(str(none), "speech") is None
    with pytest.raises(DataError, match="one string"):
        load_references(str(bad), "speech")
    with pytest.raises(DataError, match="no 'ref' array"):
        load_references(str(none), "speech", labels_column="ref")
    assert load_references(str(table), "text") is None  # text labels only when named
    # the empty text row is dropped together with its label; a missing label is ""
    assert read_table(table, None, "ref") == (["x y", "z"], ["y x", ""])
    assert load_references(str(table), "text", labels_column="ref") == ["y x", ""]


def test_metric_drop_budget_needs_labels() -> None:
    # setup
    from bladeflow.core.params import OptimizeParams
    from bladeflow.flows.generation import _policy

    params = OptimizeParams(source="m", name="m", accuracy="metric_drop<=0.02")
    # execute / assert
    assert _policy(params, ["a b"]).max_metric_drop == 0.02
    assert _policy(OptimizeParams(source="m", name="m"), None).max_metric_drop is None
    with pytest.raises(DataError, match="metric_drop needs reference texts"):
        _policy(params, None)
