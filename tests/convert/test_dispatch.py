"""Format detection, refusals, ONNX sources and the verification API (no heavy frameworks)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bladeflow.core.contract import Tolerance
from bladeflow.core.errors import ModelFileError, UserInputError
from bladeflow.tasks.convert.base import load_converters
from bladeflow.tasks.convert.dispatch import (
    ConversionError,
    ConvertOptions,
    convert_source,
    detect,
    open_source_runner,
    verify_conversion,
)
from bladeflow.tasks.convert.onnx_source import OrtRunner, opset_of
from tests import models


def test_every_converter_registers_once_with_a_description():
    # execute
    converters = load_converters()
    # assert
    assert set(converters) >= {
        "onnx",
        "tf_savedmodel",
        "keras",
        "torchscript",
        "torch_export",
        "torch_callable",
        "huggingface",
        "mlflow",
        "sklearn",
        "caffe",
    }
    assert all(c.description for c in converters.values())


def test_importing_dispatch_loads_no_heavy_framework():
    # setup
    code = (
        "import sys, bladeflow.tasks.convert.dispatch, bladeflow.tasks.convert.base as b;"
        "b.load_converters();"
        "heavy = [m for m in ('torch','tensorflow','tf2onnx','transformers','skl2onnx','keras')"
        " if m in sys.modules]; print(heavy)"
    )
    # execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # assert
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("m.keras", "keras"),
        ("m.h5", "keras"),
        ("m.pt2", "torch_export"),
        ("m.pt", "torchscript"),
        ("m.skops", "sklearn"),
        ("m.caffemodel", "caffe"),
        ("sm/saved_model.pb", "tf_savedmodel"),
        ("hf/config.json+hf/model.safetensors", "huggingface"),
    ],
)
def test_detect_by_path(tmp_path: Path, layout: str, expected: str):
    # setup
    for rel in layout.split("+"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    source = tmp_path / layout.split("+")[0]
    if "/" in layout:
        source = source.parent
    # execute
    found = detect(str(source))
    # assert
    assert found == expected


def test_detect_uris_and_callables():
    assert detect("models:/encoder/3") == "mlflow"
    assert detect("models:/encoder@champion") == "mlflow"
    assert detect("runs:/0123abcd/model") == "mlflow"
    assert detect("mypkg.models:build") == "torch_callable"


def test_unknown_format_lists_supported(tmp_path: Path):
    # setup
    src = tmp_path / "model.bin"
    src.write_bytes(b"x")
    # execute / assert
    with pytest.raises(ModelFileError, match=r"onnx: .*keras: .*--format"):
        detect(str(src))
    with pytest.raises(ModelFileError, match="unknown --format 'caffe2'"):
        detect(str(src), "caffe2")


@pytest.mark.parametrize("suffix", [".pkl", ".joblib"])
def test_pickles_are_refused_with_the_reason(tmp_path: Path, suffix: str):
    # setup
    src = tmp_path / f"model{suffix}"
    src.write_bytes(pickle.dumps({"weights": [1, 2]}))
    # execute / assert
    with pytest.raises(ModelFileError, match=r"pickle: loading it runs arbitrary code.*skops"):
        detect(str(src))


def test_corrupt_caffemodel_is_refused(tmp_path: Path):
    # setup
    (tmp_path / "net.prototxt").write_text('name: "net" input: "x" input_shape { dim: 1 dim: 2 }\n')
    (tmp_path / "net.caffemodel").write_bytes(b"\x00")
    # execute / assert
    with pytest.raises(
        ModelFileError, match=r"net\.caffemodel is not a readable binary \.caffemodel"
    ):
        convert_source(str(tmp_path), tmp_path / "work", ConvertOptions())
    assert not (tmp_path / "work" / "model.onnx").exists()


def test_onnx_source_through_dispatch(tmp_path: Path):
    # setup
    src = models.token_model(tmp_path / "tokens.onnx")
    # execute
    art = convert_source(str(src), tmp_path / "work", ConvertOptions())
    # assert
    assert art.path == str(tmp_path / "work" / "model.onnx")
    assert art.provenance.step is not None and art.provenance.step.name == "convert.onnx"
    config = json.loads((tmp_path / "work" / "convert_config.json").read_text())
    assert config["name"] == "convert.onnx" and config["verification"]["runner"] is None
    assert open_source_runner(str(src), ConvertOptions(), art) is None
    assert [p.name for p in (tmp_path / "work").iterdir()] != []
    assert not list((tmp_path / "work").glob(".convert-*"))


def test_onnx_opset_upgrade_is_verified_against_the_original(tmp_path: Path):
    # setup
    src = models.mlp(tmp_path / "mlp.onnx")
    # execute
    art = convert_source(str(src), tmp_path / "work", ConvertOptions(target_opset=19))
    # assert
    assert opset_of(onnx.load(art.path)) == 19
    config = json.loads((tmp_path / "work" / "convert_config.json").read_text())
    assert config["config"]["source_opset"] == 17
    assert config["verification"]["runner"] == "onnxruntime"
    assert config["verification"]["outputs"]["y"]["max_abs_error"] < 1e-5


def test_onnx_external_data_model_with_opset_upgrade(tmp_path: Path):
    # setup: weights in a separate file beside the graph
    model = onnx.load(models.mlp(tmp_path / "plain.onnx"))
    src = tmp_path / "ext" / "mlp.onnx"
    src.parent.mkdir()
    onnx.save_model(
        model, str(src), save_as_external_data=True, location="mlp.onnx.data", size_threshold=0
    )
    # execute
    art = convert_source(str(src), tmp_path / "work", ConvertOptions(target_opset=18))
    # assert
    assert (tmp_path / "ext" / "mlp.onnx.data").is_file()
    assert opset_of(onnx.load(art.path)) == 18
    config = json.loads((tmp_path / "work" / "convert_config.json").read_text())
    assert config["verification"]["outputs"]["y"]["max_abs_error"] < 1e-5


def test_onnx_unknown_operator_is_named(tmp_path: Path):
    src = models.unknown_op(tmp_path / "custom.onnx")
    with pytest.raises(ModelFileError, match="FancyOp"):
        convert_source(str(src), tmp_path / "work", ConvertOptions())


def test_verify_conversion_names_output_error_and_tolerance(tmp_path: Path):
    # setup
    src = models.mlp(tmp_path / "mlp.onnx")
    art = convert_source(str(src), tmp_path / "work", ConvertOptions())
    honest = OrtRunner(src)

    class Drifting:
        name = "drifting"

        def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: v + 0.01 for k, v in honest(feeds).items()}

    data = {"x": np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)}
    # execute
    ok = verify_conversion(honest, art, data, Tolerance())
    # assert
    assert ok["y"].max_abs_error == 0.0 and ok["y"].samples == 5
    with pytest.raises(ConversionError, match=r"output 'y'.*max abs error 0\.01.*atol 0\.0001"):
        verify_conversion(Drifting(), art, data, Tolerance())
    assert issubclass(ConversionError, UserInputError) and ConversionError.exit_code == 2


@pytest.mark.parametrize(
    ("blocked", "source", "extra"),
    [
        ("torch", "tests.convert.torch_models:build_encoder", "torch"),
        ("tensorflow", "model.keras", "tf"),
    ],
)
def test_missing_framework_says_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocked: str, source: str, extra: str
):
    # setup: the framework's import fails as if it were not installed
    monkeypatch.setitem(sys.modules, blocked, None)
    if source.endswith(".keras"):
        (tmp_path / source).write_bytes(b"x")
        source = str(tmp_path / source)
    # execute / assert
    with pytest.raises(ModelFileError, match=rf"pip install 'bladeflow\[{extra}\]'"):
        convert_source(source, tmp_path / "w", ConvertOptions())
    assert not (tmp_path / "w" / "model.onnx").exists()
