"""Fixtures for the optimization-pass tests: tiny models built in code, their data and reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import DataRef, ModelArtifact, Tolerance
from bladeflow.tasks.convert.onnx_source import load_onnx_source
from bladeflow.tasks.optimize.base import PassContext
from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, predict
from bladeflow.tasks.validate.data import Dataset, synthesize


@dataclass
class Prepared:
    """A converted model with validation data and the reference outputs on disk."""

    model: ModelArtifact
    data: Dataset
    reference: dict[str, np.ndarray]
    data_path: Path
    reference_path: Path

    def context(self, tolerance: Tolerance, budget: float = 60.0) -> PassContext:
        return PassContext(
            data=DataRef(
                path=str(self.data_path),
                samples=len(next(iter(self.data.values()))),
                synthetic=True,
            ),
            reference_path=str(self.reference_path),
            tolerance=tolerance,
            time_budget_s=budget,
        )


def prepare(source: Path, folder: Path, samples: int = 16) -> Prepared:
    model = load_onnx_source(source, folder / "converted")
    data = synthesize(model.signature, samples=samples)
    reference = predict(model, REFERENCE_SESSION, data)
    np.savez(folder / "data.npz", **data)
    np.savez(folder / "reference.npz", **reference)
    return Prepared(model, data, reference, folder / "data.npz", folder / "reference.npz")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """A 2-layer BERT (hidden 32, 2 heads), TorchScript export with eager attention (once)."""
    from tests.optimize import tiny

    folder = tmp_path_factory.mktemp("tiny-bert")
    return prepare(tiny.bert(folder / "bert.onnx"), folder)
