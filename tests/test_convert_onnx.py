from __future__ import annotations

from pathlib import Path

import pytest

from bladeflow.core.errors import ModelFileError
from bladeflow.core.hashing import sha256_path
from bladeflow.tasks.convert.detect import detect_format
from bladeflow.tasks.convert.onnx_source import load_onnx_source
from tests import models


def test_admits_model_and_records_signature(tmp_path: Path):
    # setup
    src = models.token_model(tmp_path / "tokens.onnx")
    # execute
    art = load_onnx_source(src, tmp_path / "work")
    # assert
    assert Path(art.path).is_file() and art.format == "onnx"
    assert [(s.name, s.dtype, s.shape) for s in art.signature.inputs] == [
        ("input_ids", "int64", ["batch", "sequence"]),
        ("attention_mask", "int64", ["batch", "sequence"]),
    ]
    assert art.signature.outputs[0].name == "pooled"
    assert art.signature.outputs[0].dtype == "float32"
    assert art.provenance.parent_sha256 == sha256_path(src)
    assert art.provenance.step is not None and art.provenance.step.name == "convert.onnx"
    assert "onnxruntime" in art.provenance.tool_versions
    assert (tmp_path / "work" / "convert_config.json").is_file()


def test_empty_file_is_refused(tmp_path: Path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        load_onnx_source(empty, tmp_path / "w")


def test_corrupt_file_is_refused(tmp_path: Path):
    src = models.mlp(tmp_path / "m.onnx")
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"truncated\.onnx"):
        load_onnx_source(bad, tmp_path / "w")


def test_text_file_is_refused(tmp_path: Path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelFileError):
        load_onnx_source(bad, tmp_path / "w")


def test_unknown_operator_names_it(tmp_path: Path):
    src = models.unknown_op(tmp_path / "custom.onnx")
    with pytest.raises(ModelFileError, match=r"FancyOp|custom op"):
        load_onnx_source(src, tmp_path / "w")


def test_detect_format(tmp_path: Path):
    src = models.mlp(tmp_path / "m.onnx")
    assert detect_format(str(src)) == "onnx"
    other = tmp_path / "model.pkl"
    other.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="--format"):
        detect_format(str(other))
    with pytest.raises(ModelFileError, match="does not exist"):
        detect_format(str(tmp_path / "missing.onnx"))
