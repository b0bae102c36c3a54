"""Fixtures for the validation tests: tiny ONNX models wrapped as artifacts, a tiny tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bladeflow.core.contract import ModelArtifact, Provenance, Signature, TensorSpec
from tests.models import mlp, token_model

MLP_SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 8])],
    outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 4])],
)
TOKEN_SIGNATURE = Signature(
    inputs=[
        TensorSpec(
            name="input_ids", dtype="int64", shape=["batch", "sequence"], value_range=[0, 32]
        ),
        TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "sequence"]),
    ],
    outputs=[TensorSpec(name="pooled", dtype="float32", shape=["batch", 8])],
)
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "ran", "fast", "slow"]


def artifact(
    path: Path, signature: Signature, assets: dict[str, str] | None = None
) -> ModelArtifact:
    """A ModelArtifact for a model file, without going through the convert stage."""
    blob = path.read_bytes()
    return ModelArtifact(
        path=str(path),
        format="onnx",
        sha256=hashlib.sha256(blob).hexdigest(),
        size_bytes=len(blob),
        signature=signature,
        provenance=Provenance(source=str(path)),
        assets=assets or {},
    )


@pytest.fixture
def mlp_artifact(tmp_path: Path) -> ModelArtifact:
    return artifact(mlp(tmp_path / "mlp.onnx"), MLP_SIGNATURE)


@pytest.fixture
def token_artifact(tmp_path: Path) -> ModelArtifact:
    return artifact(token_model(tmp_path / "tokens.onnx", vocab=32), TOKEN_SIGNATURE)


@pytest.fixture
def tiny_tokenizer(tmp_path: Path) -> Path:
    """A BERT WordPiece tokenizer with a 17-token vocabulary (ids < the token model's 32)."""
    from transformers import BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    folder = tmp_path / "tokenizer"
    # transformers 5 ignores vocab_file here; a vocab dict works in 4.x and 5.x.
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(folder)
    return folder
