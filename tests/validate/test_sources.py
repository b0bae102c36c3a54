"""Reading validation data: .npz, .parquet, .csv, .jsonl, a folder of .npy, text via a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import DataError
from bladeflow.tasks.validate.prepare import (
    prepare_data,
    prepare_validation_data,
    read_data,
    read_labels,
)

X = np.random.default_rng(1).standard_normal((12, 8)).astype(np.float32)
LABELS = np.arange(12) % 4


def _frame_with_list_column() -> pd.DataFrame:
    return pd.DataFrame({"x": [row.tolist() for row in X], "label": LABELS})


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_table_with_a_list_column_per_input(
    tmp_path: Path, mlp_artifact: ModelArtifact, suffix: str
):
    # setup
    path = tmp_path / f"val{suffix}"
    frame = _frame_with_list_column()
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:  # a CSV cell holds the list as JSON text
        frame.assign(x=[json.dumps(v) for v in frame["x"]]).to_csv(path, index=False)
    # execute
    prepared = prepare_validation_data(mlp_artifact, str(path), tmp_path / "run")
    # assert
    arrays = read_data(prepared.data)
    np.testing.assert_allclose(arrays["x"], X, rtol=1e-6)
    assert arrays["x"].dtype == np.float32 and prepared.data.samples == 12
    assert not prepared.data.synthetic
    np.testing.assert_array_equal(read_labels(prepared), LABELS)
    assert Path(prepared.checks[0]).is_file()


def test_csv_with_one_column_per_feature(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup: a plain tabular file, f0..f7 plus a label
    path = tmp_path / "val.csv"
    pd.DataFrame(X, columns=[f"f{i}" for i in range(8)]).assign(label=LABELS).to_csv(
        path, index=False
    )
    # execute
    prepared = prepare_validation_data(mlp_artifact, str(path), tmp_path / "run")
    # assert
    np.testing.assert_allclose(read_data(prepared.data)["x"], X, rtol=1e-6)
    assert read_labels(prepared) is not None


def test_folder_of_npy_and_separate_calibration(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup
    folder = tmp_path / "val"
    folder.mkdir()
    np.save(folder / "x.npy", X)
    np.save(folder / "labels.npy", LABELS)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=X[:5] * 2)
    # execute
    prepared = prepare_validation_data(
        mlp_artifact, str(folder), tmp_path / "run", calibration=str(calib)
    )
    # assert
    np.testing.assert_array_equal(read_data(prepared.data)["x"], X)
    np.testing.assert_array_equal(read_labels(prepared), LABELS)
    assert prepared.calibration is not None and prepared.calibration.samples == 5
    np.testing.assert_array_equal(read_data(prepared.calibration)["x"], X[:5] * 2)
    assert len(prepared.checks) == 2


def test_old_entry_point_still_returns_a_dataref(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup
    path = tmp_path / "val.npz"
    np.savez(path, x=X)
    # execute
    ref = prepare_data(mlp_artifact, str(path), tmp_path / "run")
    synthetic = prepare_data(mlp_artifact, None, tmp_path / "synth")
    # assert
    assert ref.samples == 12 and not ref.synthetic
    assert synthetic.synthetic and synthetic.samples > 0


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("not,a\n1,2\n", "val.csv", "input 'x' is present"),
        ("{}", "val.txt", "unknown kind '.txt'"),
        ("", "missing.csv", "does not exist"),
    ],
)
def test_unusable_files_raise_data_error(
    tmp_path: Path, mlp_artifact: ModelArtifact, content: str, name: str, message: str
):
    # setup
    path = tmp_path / name
    if name != "missing.csv":
        path.write_text(content)
    # execute / assert
    with pytest.raises(DataError, match=message):
        prepare_validation_data(mlp_artifact, str(path), tmp_path / "run")


def test_text_without_tokenizer_is_a_data_error(tmp_path: Path, token_artifact: ModelArtifact):
    # setup
    path = tmp_path / "val.csv"
    pd.DataFrame({"text": ["the cat sat", "a dog ran"]}).to_csv(path, index=False)
    # execute / assert
    with pytest.raises(DataError, match="no tokenizer asset"):
        prepare_validation_data(token_artifact, str(path), tmp_path / "run")


@pytest.mark.torch
def test_text_column_is_tokenized_with_the_models_tokenizer(
    tmp_path: Path, token_artifact: ModelArtifact, tiny_tokenizer: Path
):
    # setup
    model = token_artifact.model_copy(update={"assets": {"tokenizer": str(tiny_tokenizer)}})
    path = tmp_path / "val.jsonl"
    texts = ["the cat sat on the mat", "a dog ran", "blue"]
    pd.DataFrame({"text": texts, "label": [1, 0, 1]}).to_json(path, orient="records", lines=True)
    # execute
    prepared = prepare_validation_data(model, str(path), tmp_path / "run")
    # assert
    arrays = read_data(prepared.data)
    assert arrays["input_ids"].shape == arrays["attention_mask"].shape == (3, 8)  # CLS+6+SEP
    # [CLS] the cat sat on the mat [SEP]: ids from the tokenizer's own vocabulary
    assert arrays["input_ids"][0].tolist() == [2, 5, 6, 8, 9, 5, 10, 3]
    assert arrays["attention_mask"][2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert arrays["input_ids"].max() < 32


@pytest.mark.torch
def test_text_pair_columns_and_out_of_vocab_tokenizer(
    tmp_path: Path, token_artifact: ModelArtifact, tiny_tokenizer: Path
):
    # setup: a pair of texts for a matching model
    model = token_artifact.model_copy(update={"assets": {"tokenizer": str(tiny_tokenizer)}})
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(
        {"a": ["the cat", "a dog"], "b": ["sat", "ran fast"], "label": [0.2, 0.9]}
    ).to_parquet(path)
    # execute
    arrays = read_data(prepare_validation_data(model, str(path), tmp_path / "run").data)
    # assert: [CLS] the cat [SEP] sat [SEP]
    assert arrays["input_ids"][0, :6].tolist() == [2, 5, 6, 3, 8, 3]
    # setup: the same text against a model whose vocabulary is smaller than the tokenizer's
    small = model.model_copy(
        update={
            "signature": model.signature.model_copy(
                update={
                    "inputs": [
                        model.signature.inputs[0].model_copy(update={"value_range": [0, 6]}),
                        model.signature.inputs[1],
                    ]
                }
            )
        }
    )
    # execute / assert
    with pytest.raises(DataError, match=r"input_ids: token ids < 6"):
        prepare_validation_data(small, str(path), tmp_path / "run2")
