"""Prepare the validation data of a flow run as a ``.npz`` file next to the converted model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bladeflow.contract import DataRef, ModelArtifact
from tasks.validate.data import check_dataset, load_npz, sample_count, synthesize


def prepare_data(model: ModelArtifact, data: str | None, workdir: Path) -> DataRef:
    """Load and check the user's data, or synthesize inputs from the signature.

    The checked (dtype-cast) arrays are written to ``workdir/data.npz`` so every later stage and
    the MLflow run use exactly the same inputs.
    """
    if data:
        arrays = load_npz(data, model.signature)
        synthetic = False
    else:
        arrays = check_dataset(synthesize(model.signature), model.signature, origin="synthetic")
        synthetic = True
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "data.npz"
    np.savez(out, **arrays)
    return DataRef(path=str(out), samples=sample_count(arrays), synthetic=synthetic)


def read_data(ref: DataRef) -> dict[str, np.ndarray]:
    with np.load(ref.path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
