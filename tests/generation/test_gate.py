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
