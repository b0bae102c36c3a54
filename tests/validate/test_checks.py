"""The Great Expectations data suite: every violated expectation is named in a DataError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import DataError
from bladeflow.core.policy import DataPolicy
from bladeflow.tasks.validate.checks import check_data
from bladeflow.tasks.validate.prepare import prepare_validation_data
from tests.validate.conftest import TOKEN_SIGNATURE


def _tokens(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, 32, (n, 7)).astype(np.int64),
        "attention_mask": np.ones((n, 7), np.int64),
    }


def test_valid_data_passes_every_expectation(tmp_path: Path):
    # setup
    gx_path = tmp_path / "gx" / "data.json"
    # execute
    arrays, suite = check_data(_tokens(), TOKEN_SIGNATURE, gx_path=gx_path)
    # assert
    assert suite.success and not suite.failed
    assert set(arrays) == {"input_ids", "attention_mask"}
    saved = json.loads(gx_path.read_text())
    assert saved["success"] is True and saved["great_expectations"]["results"]


def _oov(d: dict[str, np.ndarray]) -> None:
    d["input_ids"][2, 3] = 32  # == vocab size: one past the last valid id


@pytest.mark.parametrize(
    ("mutate", "policy", "expected"),
    [
        (lambda d: d.update(ids=d.pop("input_ids")), DataPolicy(), "input 'input_ids' is present"),
        (lambda d: d.update(extra=np.zeros((6, 7))), DataPolicy(), "arrays are exactly the model"),
        (_oov, DataPolicy(), "input_ids: token ids < 32 (range [0, 32))"),
        (lambda d: d["input_ids"].__setitem__((0, 0), -1), DataPolicy(), "token ids >= 0"),
        (lambda d: None, DataPolicy(min_rows=10), "at least 10 samples"),
        (
            lambda d: d.update(attention_mask=np.ones((6, 5), np.int64)),
            DataPolicy(),
            "attention_mask: same shape as input_ids",
        ),
        (
            lambda d: d.update(input_ids=d["input_ids"].astype(np.float32)),
            DataPolicy(),
            "input_ids: dtype usable as int64",
        ),
        (
            lambda d: d.update(input_ids=d["input_ids"][:, 0]),
            DataPolicy(),
            "input_ids: sample shape [sequence]",
        ),
        (
            lambda d: d.update(attention_mask=d["attention_mask"][:4]),
            DataPolicy(),
            "attention_mask: one value per sample",
        ),
    ],
)
def test_each_violation_names_its_expectation(mutate, policy: DataPolicy, expected: str):
    # setup
    data = _tokens()
    mutate(data)
    # execute
    with pytest.raises(DataError) as info:
        check_data(data, TOKEN_SIGNATURE, policy, origin="val.npz")
    # assert
    message = str(info.value)
    assert expected in message
    assert "expect_" in message and "val.npz" in message


def test_nan_and_image_range_are_checked(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup
    x = np.random.default_rng(0).uniform(0, 1, (5, 8)).astype(np.float32)
    nan = x.copy()
    nan[1, 2] = np.nan
    # execute / assert: NaN
    with pytest.raises(DataError, match=r"x: no NaN/inf \[expect_column_values_to_be_between\]"):
        check_data({"x": nan}, mlp_artifact.signature)
    # execute / assert: a configured image range [0, 1] with a value of 2
    bright = x.copy()
    bright[4, 0] = 2.0
    policy = DataPolicy(value_ranges={"x": (0.0, 1.0)})
    with pytest.raises(DataError, match=r"x: values <= 1 \(range \[0, 1\]\).*rows \[4\]"):
        check_data({"x": bright}, mlp_artifact.signature, policy)
    check_data({"x": x}, mlp_artifact.signature, policy)  # in range: no error


def test_prepare_saves_gx_result_even_when_the_check_fails(
    tmp_path: Path, token_artifact: ModelArtifact
):
    # setup
    data = _tokens()
    _oov(data)
    path = tmp_path / "bad.npz"
    np.savez(path, **data)
    # execute
    with pytest.raises(DataError, match="token ids < 32"):
        prepare_validation_data(token_artifact, str(path), tmp_path / "run")
    # assert
    saved = json.loads((tmp_path / "run" / "gx" / "validation-data.json").read_text())
    assert saved["success"] is False
    assert [c["name"] for c in saved["checks"] if not c["success"]] == [
        "input_ids: token ids < 32 (range [0, 32))"
    ]


def test_missing_labels_fail_the_labels_expectation(token_artifact: ModelArtifact):
    # setup
    labels = np.array([0, 1, np.nan, 1, 0, 1])
    # execute / assert
    with pytest.raises(DataError, match="labels: one per sample, none missing"):
        check_data(_tokens(), token_artifact.signature, labels=labels)
