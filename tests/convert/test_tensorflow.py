"""TensorFlow sources: Keras 3 .keras/.h5 (safe mode) and SavedModel signatures, via tf2onnx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.dispatch import (
    ConversionError,
    ConvertOptions,
    convert_source,
    detect,
    open_source_runner,
)

pytestmark = pytest.mark.tf
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")


def _max_abs(work: Path) -> float:
    outputs = json.loads((work / "convert_config.json").read_text())["verification"]["outputs"]
    for name, acc in outputs.items():
        print(
            f"MAXERR {work.name} {name} abs={acc['max_abs_error']:.3g} "
            f"rel={acc['max_rel_error']:.3g}"
        )
    return max(a["max_abs_error"] for a in outputs.values())


def _conv_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    image = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    return keras.Model(image, out)


def _recurrent_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    seq = keras.Input((None, 5), name="seq")
    x = keras.layers.GRU(6, return_sequences=True)(seq)
    x = keras.layers.LSTM(4)(x)
    out = keras.layers.Dense(2, name="score")(x)
    return keras.Model(seq, out)


def _lambda_model() -> keras.Model:
    inp = keras.Input((4,), name="x")
    out = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    return keras.Model(inp, out)


def _svd_savedmodel(path: Path) -> Path:
    class Svd(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.ones((4, 4)))

        @tf.function(input_signature=[tf.TensorSpec([None, 4, 4], tf.float32, name="x")])
        def __call__(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"s": tf.linalg.svd(x @ self.w, compute_uv=False)}

    module = Svd()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.__call__})
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tf-sources")
    conv, rec = _conv_model(), _recurrent_model()
    conv.save(root / "conv.keras")
    rec.save(root / "recurrent.h5")
    conv.export(str(root / "conv_savedmodel"), verbose=False)
    lam = _lambda_model()
    lam.save(root / "lambda.keras")
    lam.save(root / "lambda.h5")
    return {
        "keras": root / "conv.keras",
        "h5": root / "recurrent.h5",
        "savedmodel": root / "conv_savedmodel",
        "lambda_keras": root / "lambda.keras",
        "lambda_h5": root / "lambda.h5",
    }


def test_keras_file_converts_and_matches(sources: dict[str, Path], tmp_path: Path):
    # setup
    work = tmp_path / "keras_conv"
    # execute
    art = convert_source(str(sources["keras"]), work, ConvertOptions())
    # assert
    assert detect(str(sources["keras"])) == "keras"
    assert [(s.name, s.shape) for s in art.signature.inputs] == [("image", ["batch", 12, 12, 3])]
    assert [o.name for o in art.signature.outputs] == ["probs"]
    assert _max_abs(work) < 1e-5
    runner = open_source_runner(str(sources["keras"]), ConvertOptions(), art)
    assert runner is not None and runner.name == "keras"


def test_h5_recurrent_with_fixed_sequence(sources: dict[str, Path], tmp_path: Path):
    # setup
    work = tmp_path / "h5_recurrent"
    options = ConvertOptions(input_shapes={"seq": [1, 7, 5]})
    # execute
    art = convert_source(str(sources["h5"]), work, options)
    # assert
    assert art.signature.inputs[0].shape == ["batch", 7, 5]
    assert _max_abs(work) < 1e-5


@pytest.mark.parametrize("kind", ["lambda_keras", "lambda_h5"])
def test_lambda_layers_are_refused(sources: dict[str, Path], tmp_path: Path, kind: str):
    with pytest.raises(ModelFileError, match=r"Lambda layer with Python code.*safe mode"):
        convert_source(str(sources[kind]), tmp_path / "w", ConvertOptions())
    assert not (tmp_path / "w" / "model.onnx").exists()


def test_savedmodel_signature_choice(sources: dict[str, Path], tmp_path: Path):
    # setup
    src = str(sources["savedmodel"])
    # execute
    default = convert_source(src, tmp_path / "savedmodel_default", ConvertOptions())
    serve = convert_source(src, tmp_path / "savedmodel_serve", ConvertOptions(signature="serve"))
    # assert
    assert detect(src) == "tf_savedmodel"
    assert [o.name for o in default.signature.outputs] == ["output_0"]
    assert default.signature.inputs[0].shape == ["batch", 12, 12, 3]
    assert default.provenance.step is not None
    assert default.provenance.step.config["signature"] == "serving_default"
    assert (
        serve.provenance.step is not None and serve.provenance.step.config["signature"] == "serve"
    )
    assert _max_abs(tmp_path / "savedmodel_default") < 1e-5


def test_unknown_signature_lists_the_real_ones(sources: dict[str, Path], tmp_path: Path):
    with pytest.raises(
        ModelFileError, match=r"no signature 'predict'.*\['serve', 'serving_default'\]"
    ):
        convert_source(
            str(sources["savedmodel"]), tmp_path / "w", ConvertOptions(signature="predict")
        )


def test_unsupported_tf_operator_is_named(tmp_path: Path):
    # setup
    src = _svd_savedmodel(tmp_path / "svd_savedmodel")
    # execute / assert
    with pytest.raises(ConversionError, match=r"operator 'Svd' .*node '[^']*Svd'.*custom op"):
        convert_source(str(src), tmp_path / "w", ConvertOptions())
    assert list((tmp_path / "w").iterdir()) == []


def test_truncated_savedmodel_is_refused(sources: dict[str, Path], tmp_path: Path):
    # setup: the variables are missing, as after an interrupted copy
    broken = tmp_path / "broken_savedmodel"
    shutil.copytree(sources["savedmodel"], broken)
    shutil.rmtree(broken / "variables")
    # execute / assert
    with pytest.raises(ModelFileError, match=r"cannot load the SavedModel .*incomplete"):
        convert_source(str(broken), tmp_path / "w", ConvertOptions())
    assert not (tmp_path / "w" / "model.onnx").exists()
