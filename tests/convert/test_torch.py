"""PyTorch sources: module:callable, TorchScript, torch.export .pt2; refusals and failures."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import Tolerance
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.dispatch import (
    ConversionError,
    ConvertOptions,
    convert_source,
    open_source_runner,
    verify_conversion,
)
from bladeflow.tasks.validate.data import synthesize

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

MODELS = "tests.convert.torch_models"


def _report(workdir: Path) -> dict:
    return json.loads((workdir / "convert_config.json").read_text())["verification"]


def _max_abs(workdir: Path) -> float:
    outputs = _report(workdir)["outputs"]
    for name, acc in outputs.items():
        print(
            f"MAXERR {workdir.name} {name} abs={acc['max_abs_error']:.3g} "
            f"rel={acc['max_rel_error']:.3g}"
        )
    return max(a["max_abs_error"] for a in outputs.values())


def _convnet_torchscript(path: Path) -> Path:
    from tests.convert.torch_models import ConvNet

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(ConvNet().eval()), str(path))
    return path


def test_callable_attention_encoder(tmp_path: Path):
    # setup
    work = tmp_path / "encoder"
    # execute
    art = convert_source(f"{MODELS}:build_encoder", work, ConvertOptions())
    # assert
    assert [(s.name, s.dtype, s.shape) for s in art.signature.inputs] == [
        ("input_ids", "int64", ["batch", "sequence"]),
        ("attention_mask", "int64", ["batch", "sequence"]),
    ]
    assert art.signature.outputs[0].shape == ["batch", 16]
    assert art.provenance.step is not None and art.provenance.step.name == "convert.torch_callable"
    assert _report(work)["runner"] == "pytorch-eager"
    assert _max_abs(work) < 1e-4


def test_callable_recurrent_keeps_dynamic_sequence(tmp_path: Path):
    # setup
    work = tmp_path / "recurrent"
    # execute
    art = convert_source(f"{MODELS}:build_recurrent", work, ConvertOptions())
    # assert
    assert art.signature.inputs[0].shape == ["batch", "sequence", 6]
    assert [o.name for o in art.signature.outputs] == ["output_0", "output_1"]
    assert art.signature.outputs[0].shape == ["batch", "sequence", 5]
    assert _max_abs(work) < 1e-4
    # a longer sequence than the export's example (5) runs and still matches
    runner = open_source_runner(f"{MODELS}:build_recurrent", ConvertOptions(), art)
    assert runner is not None
    seq = {"seq": np.random.default_rng(3).standard_normal((3, 11, 6)).astype(np.float32)}
    assert verify_conversion(runner, art, seq, Tolerance())["output_0"].samples == 3


def test_torchscript_with_input_shapes(tmp_path: Path):
    # setup
    src = _convnet_torchscript(tmp_path / "convnet.pt")
    work = tmp_path / "torchscript"
    # execute
    art = convert_source(str(src), work, ConvertOptions(input_shapes={"image": [1, 3, 16, 16]}))
    # assert
    assert art.signature.inputs[0].shape == ["batch", 3, 16, 16]
    assert _report(work)["runner"] == "torchscript"
    assert _max_abs(work) < 1e-4
    assert art.provenance.parent_sha256 is not None


def test_torchscript_without_shapes_says_which_to_pass(tmp_path: Path):
    src = _convnet_torchscript(tmp_path / "convnet.pt")
    with pytest.raises(ModelFileError, match=r"input_shapes for \['image'\]"):
        convert_source(str(src), tmp_path / "work", ConvertOptions())


def test_torch_save_pickle_posing_as_torchscript_is_refused(tmp_path: Path):
    # setup: torch.save of a whole module is a zip of pickles; a plain pickle is worse
    from tests.convert.torch_models import ConvNet

    zipped = tmp_path / "model.pt"
    torch.save(ConvNet(), zipped)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"state": [1.0, 2.0]}))
    # execute / assert
    with pytest.raises(ModelFileError, match=r"torch.save\(\) pickle archive, not TorchScript"):
        convert_source(str(zipped), tmp_path / "w1", ConvertOptions())
    with pytest.raises(ModelFileError, match=r"is a Python pickle, not TorchScript"):
        convert_source(str(raw), tmp_path / "w2", ConvertOptions())


def test_exported_program_pt2(tmp_path: Path):
    # setup
    from tests.convert.torch_models import ConvNet

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", max=1024)
    program = torch.export.export(
        ConvNet().eval(), (torch.randn(2, 3, 16, 16),), dynamic_shapes={"image": {0: batch}}
    )
    src = tmp_path / "convnet.pt2"
    torch.export.save(program, str(src))
    work = tmp_path / "pt2"
    # execute
    art = convert_source(str(src), work, ConvertOptions())
    # assert
    assert art.signature.inputs[0].shape == ["batch", 3, 16, 16]
    assert _max_abs(work) < 1e-4
    runner = open_source_runner(str(src), ConvertOptions(), art)
    assert runner is not None and runner.name == "pytorch-export"


def test_unsupported_operator_is_named_and_nothing_is_left(tmp_path: Path):
    # setup
    work = tmp_path / "svd"
    # execute / assert
    with pytest.raises(ConversionError, match=r"aten::linalg_svd.*target_opset.*custom"):
        convert_source(f"{MODELS}:build_svd", work, ConvertOptions())
    assert list(work.iterdir()) == []


def test_traced_fixed_shape_fails_verification_not_silently(tmp_path: Path):
    # setup
    work = tmp_path / "traced"
    # execute / assert
    with pytest.raises(ConversionError, match=r"fails in ONNX Runtime on inputs shaped"):
        convert_source(f"{MODELS}:build_traced_shapes", work, ConvertOptions())
    assert not (work / "model.onnx").exists()


def test_fixed_shapes_when_dynamic_axes_empty(tmp_path: Path):
    # setup: with everything fixed the same traced model converts and verifies
    options = ConvertOptions(dynamic_axes={}, input_shapes={"input_ids": [2, 7]})
    # execute
    art = convert_source(f"{MODELS}:build_traced_shapes", tmp_path / "fixed", options)
    # assert
    assert art.signature.inputs[0].shape == [2, 7]
    data = synthesize(art.signature, samples=2)
    assert data["input_ids"].shape == (4, 7)


def test_callable_errors(tmp_path: Path):
    with pytest.raises(ModelFileError, match="cannot import"):
        convert_source(f"{MODELS}:no_such_builder", tmp_path / "w", ConvertOptions())
    with pytest.raises(ModelFileError, match=r"not a torch\.nn\.Module"):
        convert_source(f"{MODELS}:build_not_a_module", tmp_path / "w", ConvertOptions())
