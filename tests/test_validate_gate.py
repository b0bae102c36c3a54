from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import Signature, TensorSpec, Tolerance
from bladeflow.core.errors import DataError
from bladeflow.tasks.validate.accuracy import compare
from bladeflow.tasks.validate.data import check_dataset, load_npz, synthesize

SIG = Signature(
    inputs=[
        TensorSpec(name="ids", dtype="int64", shape=["batch", "seq"]),
        TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "seq"]),
        TensorSpec(name="img", dtype="float32", shape=["batch", 3]),
    ],
    outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 2])],
)


def _good(n: int = 4) -> dict[str, np.ndarray]:
    return {
        "ids": np.zeros((n, 5), np.int64),
        "attention_mask": np.ones((n, 5), np.int64),
        "img": np.zeros((n, 3), np.float32),
    }


def test_matching_data_is_cast_to_model_dtypes():
    data = _good()
    data["img"] = data["img"].astype(np.float64)
    out = check_dataset(data, SIG)
    assert out["img"].dtype == np.float32


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("img"), "missing input"),
        (lambda d: d.update(image=d.pop("img")), "unknown array"),
        (lambda d: d.update(img=np.zeros((4, 5), np.float32)), "dim 1 is 5, must be 3"),
        (lambda d: d.update(img=np.zeros((4,), np.float32)), "rank 1"),
        (lambda d: d.update(ids=np.zeros((4, 6), np.int64)), "'seq'"),
        (lambda d: d.update(ids=np.zeros((4, 5), np.float32)), "cannot be used as int64"),
        (lambda d: d.update(img=np.full((4, 3), np.nan, np.float32)), "NaN"),
        (lambda d: d.update(img=np.zeros((3, 3), np.float32)), "different numbers of samples"),
    ],
)
def test_mismatched_data_names_the_problem(mutate, message: str):
    data = _good()
    mutate(data)
    with pytest.raises(DataError, match=message):
        check_dataset(data, SIG)


def test_npz_round_trip_and_errors(tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, **_good())
    assert set(load_npz(path, SIG)) == {"ids", "attention_mask", "img"}
    with pytest.raises(DataError, match=r"not a \.npz"):
        load_npz(tmp_path / "d.csv", SIG) if (tmp_path / "d.csv").write_text("a") else None
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_npz(tmp_path / "broken.npz", SIG)


def test_synthesized_inputs_share_named_dims_and_masks_are_ones():
    data = synthesize(SIG, samples=6)
    assert data["ids"].shape == data["attention_mask"].shape == (6, 16)
    assert (data["attention_mask"] == 1).all()
    assert data["img"].dtype == np.float32
    check_dataset(data, SIG)


def test_gate_accepts_exact_and_rejects_perturbed():
    rng = np.random.default_rng(0)
    ref = {"y": rng.standard_normal((10, 2)).astype(np.float32)}
    exact = compare("same", {"y": ref["y"].copy()}, ref, Tolerance(), synthetic_data=False)
    assert exact.passed and exact.outputs["y"].max_abs_error == 0.0
    bad = ref["y"].copy()
    bad[3] += 0.5
    report = compare("bad", {"y": bad}, ref, Tolerance(), synthetic_data=False)
    assert not report.passed
    assert report.outputs["y"].failing_samples == 1
    assert "1/10 samples" in report.reason and "'y'" in report.reason


def test_gate_rejects_nan_on_one_side_and_cosine_drift():
    ref = {"y": np.ones((2, 4), np.float32)}
    nan = ref["y"].copy()
    nan[0, 0] = np.nan
    assert not compare("nan", {"y": nan}, ref, Tolerance(), False).passed
    # Within a loose atol but pointing elsewhere: cosine catches it.
    flipped = np.array([[1, 1, 1, 1], [1, -1, 1, -1]], np.float32)
    loose = Tolerance(atol=10, rtol=0, min_cosine=0.99)
    rep = compare("cos", {"y": flipped}, ref, loose, False)
    assert not rep.passed and rep.outputs["y"].min_cosine == pytest.approx(0.0)


def test_gate_reports_shape_mismatch():
    ref = {"y": np.ones((2, 4), np.float32)}
    rep = compare("shape", {"y": np.ones((2, 3), np.float32)}, ref, Tolerance(), False)
    assert not rep.passed and "shape" in rep.reason
