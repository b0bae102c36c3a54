"""Prepare the validation data of a flow run as a ``.npz`` file next to the converted model.

User data (.npz, .parquet, .csv, .jsonl, a folder of .npy) is read, checked with a Great
Expectations suite (results in ``workdir/gx/``) and cast to the model dtypes; without data, inputs
are synthesized from the signature and flagged ``synthetic`` -- for a model with a tokenizer,
built-in English texts tokenized with it (also flagged: they are not the user's data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from bladeflow.core.contract import DataRef, ModelArtifact, Signature
from bladeflow.core.errors import DataError
from bladeflow.core.policy import DataPolicy
from bladeflow.core.text import builtin_sentences
from bladeflow.tasks.validate.checks import check_data
from bladeflow.tasks.validate.data import (
    DEFAULT_SYNTHETIC_SAMPLES,
    Dataset,
    check_dataset,
    sample_count,
    synthesize,
)
from bladeflow.tasks.validate.labels import as_text
from bladeflow.tasks.validate.sources import load_data, tokenize


class PreparedData(BaseModel):
    """The checked validation data of a run and everything that came with it."""

    data: DataRef
    labels: str | None = Field(None, description=".npy of one label per sample")
    calibration: DataRef | None = Field(None, description="separate calibration inputs")
    checks: list[str] = Field(default_factory=list, description="GX result JSON files")
    description: str = Field("", description="one line for the report")


def prepare_data(model: ModelArtifact, data: str | None, workdir: Path) -> DataRef:
    """Load and check the user's data, or synthesize inputs from the signature.

    The checked (dtype-cast) arrays are written to ``workdir/data.npz`` so every later stage and
    the MLflow run use exactly the same inputs.
    """
    return prepare_validation_data(model, data, workdir).data


def prepare_validation_data(
    model: ModelArtifact,
    data: str | None,
    workdir: Path,
    labels_column: str | None = None,
    text_columns: list[str] | None = None,
    calibration: str | None = None,
    policy: DataPolicy | None = None,
    synthetic_samples: int = DEFAULT_SYNTHETIC_SAMPLES,
) -> PreparedData:
    """Read, check (GX) and store validation data, labels and optional calibration data.

    Writes ``workdir/data.npz``, ``workdir/labels.npy`` (with labels), ``workdir/calibration.npz``
    (with ``calibration``) and ``workdir/gx/*.json``.

    Raises:
        DataError: the data cannot be read or fails a check (each failed expectation named).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    gx_dir = workdir / "gx"
    tokenizer = model.assets.get("tokenizer")
    checks: list[str] = []
    labels_path: str | None = None
    if data:
        loaded = load_data(data, model.signature, tokenizer, labels_column, text_columns)
        gx_path = gx_dir / "validation-data.json"
        arrays, _ = check_data(
            loaded.arrays, model.signature, policy, loaded.labels, loaded.origin, gx_path
        )
        checks.append(str(gx_path))
        synthetic = False
        if loaded.labels is not None:
            labels = _checked_labels(np.asarray(loaded.labels), data)
            labels_path = str(workdir / "labels.npy")
            np.save(labels_path, labels, allow_pickle=False)
        description = f"`{data}`, {sample_count(arrays)} samples" + (
            ", with labels" if loaded.labels is not None else ""
        )
    elif (texts := builtin_text_data(model.signature, tokenizer)) is not None:
        arrays = check_dataset(texts, model.signature, origin="built-in sentences")
        synthetic = True  # not the user's data: reported as such
        description = (
            f"{sample_count(arrays)} built-in English texts ({BUILTIN_SHORT} sentences, "
            f"{BUILTIN_LONG} paragraphs) tokenized with the model's tokenizer: no --data given; "
            "give your own texts for a gate that speaks for your traffic"
        )
    else:
        synth = synthesize(model.signature, samples=synthetic_samples)
        arrays = check_dataset(synth, model.signature, origin="synthetic")
        synthetic = True
        description = f"{sample_count(arrays)} synthetic samples generated from the signature"
    out = workdir / "data.npz"
    _savez(out, arrays)
    ref = DataRef(path=str(out), samples=sample_count(arrays), synthetic=synthetic)

    calib_ref: DataRef | None = None
    if calibration:
        loaded = load_data(calibration, model.signature, tokenizer, None, text_columns)
        gx_path = gx_dir / "calibration-data.json"
        calib, _ = check_data(
            loaded.arrays, model.signature, policy, None, f"{loaded.origin} (calibration)", gx_path
        )
        checks.append(str(gx_path))
        calib_path = workdir / "calibration.npz"
        _savez(calib_path, calib)
        calib_ref = DataRef(path=str(calib_path), samples=sample_count(calib), synthetic=False)
    return PreparedData(
        data=ref, labels=labels_path, calibration=calib_ref, checks=checks, description=description
    )


# Without --data, a model with a tokenizer is judged on real text, not random token ids: on
# random ids all-MiniLM-L6-v2's int8 passed cosine >= 0.99 with no MatMul kept in fp32, and then
# gave 0.988 on real sentences and 0.983 on 128-token texts. Short sentences and ~100-word
# paragraphs (padded together to the longest), so both regimes are in the gate and recovery.
BUILTIN_SHORT, BUILTIN_LONG = 48, 16
_PARAGRAPH_WORDS = 90


def builtin_texts(short: int = BUILTIN_SHORT, long: int = BUILTIN_LONG) -> list[str]:
    """``short`` sentences, then ``long`` paragraphs of the following sentences."""
    sentences = builtin_sentences()
    texts = sentences[:short]
    rest = iter(sentences[short:] + sentences[:short])
    for _ in range(long):
        words: list[str] = []
        while len(words) < _PARAGRAPH_WORDS:
            words += next(rest).split()
        texts.append(" ".join(words[:_PARAGRAPH_WORDS]))
    return texts


def builtin_text_data(signature: Signature, tokenizer: str | None) -> Dataset | None:
    """The built-in texts as the model's inputs, or None when the tokenizer does not produce
    every input (e.g. an image model, or inputs besides token ids and masks)."""
    if not tokenizer:
        return None
    import pandas as pd

    frame = pd.DataFrame({"text": builtin_texts()})
    try:
        arrays = tokenize(frame, ["text"], signature, tokenizer, "built-in sentences")
    except DataError:
        return None
    return arrays if set(arrays) == {s.name for s in signature.inputs} else None


def read_data(ref: DataRef) -> dict[str, np.ndarray]:
    with np.load(ref.path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def read_labels(prepared: PreparedData) -> np.ndarray | None:
    """The labels saved by :func:`prepare_validation_data`, or None."""
    if prepared.labels is None:
        return None
    try:
        return np.load(prepared.labels, allow_pickle=False)
    except ValueError as exc:  # e.g. labels saved as object arrays by another tool
        raise DataError(f"labels in {prepared.labels} are neither numbers nor text: {exc}") from exc


def _checked_labels(labels: np.ndarray, origin: str) -> np.ndarray:
    """Numbers (class ids, scores) as they are; text (class names, for a model whose output is
    a string label) as ``numpy.str_``, which saves without pickling. Anything else is refused."""
    if labels.dtype.kind in "fiub":
        return labels
    if labels.dtype.kind in "US" or (
        labels.dtype.kind == "O" and all(isinstance(v, str | bytes) for v in labels.reshape(-1))
    ):
        return as_text(labels)
    raise DataError(
        f"labels of validation data {origin} must be numbers (class ids or scores) or class "
        f"names (text), not {labels.dtype}"
    )


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    kwargs: dict[str, Any] = dict(arrays)
    np.savez(path, **kwargs)
