"""MLflow model URIs of flavor keras (Keras 3) and transformers, logged to a scratch registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "ran", "fast", "slow"]


def _max_abs(work: Path) -> float:
    config = json.loads((work / "convert_config.json").read_text())
    outputs = config["verification"]["outputs"]
    assert outputs, "the conversion was not verified against the source framework"
    for name, acc in outputs.items():
        print(
            f"MAXERR {work.name} {name} abs={acc['max_abs_error']:.3g} "
            f"rel={acc['max_rel_error']:.3g}"
        )
    return max(a["max_abs_error"] for a in outputs.values())


@pytest.mark.tf
@pytest.mark.parametrize("flavor", ["keras", "tensorflow"])
def test_mlflow_keras3_model(tmp_path: Path, mlflow_registry: str, flavor: str):
    # setup
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    import mlflow

    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="features")
    h = keras.layers.Dense(8, activation="relu")(x)
    out = keras.layers.Dense(3, name="scores")(h)
    model = keras.Model(x, out)
    name = f"{flavor}_mlp"
    log_model = mlflow.keras.log_model if flavor == "keras" else mlflow.tensorflow.log_model
    with mlflow.start_run():
        # MLflow 3 saves a Keras 3 model as data/model.keras under either flavor.
        log_model(model, name="model", registered_model_name=name, pip_requirements=[])
    work = tmp_path / f"mlflow_{flavor}"
    # execute
    art = convert_source(f"models:/{name}/1", work, ConvertOptions())
    # assert
    assert (work / "model.onnx").is_file()
    assert art.provenance.step is not None
    assert art.provenance.step.config["mlflow_flavor"] == flavor
    assert art.provenance.step.config["inner_format"] == "keras"
    assert [(s.name, s.dtype, s.shape) for s in art.signature.inputs] == [
        ("features", "float32", ["batch", 6])
    ]
    assert [(o.name, o.shape) for o in art.signature.outputs] == [("scores", ["batch", 3])]
    verification = json.loads((work / "convert_config.json").read_text())["verification"]
    assert verification["runner"] == "keras"
    assert _max_abs(work) < 1e-4


@pytest.mark.torch
def test_mlflow_transformers_tiny_bert(tmp_path: Path, mlflow_registry: str):
    # setup
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import mlflow

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    model = transformers.BertModel(config).eval()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # transformers 5 ignores vocab_file here; a vocab dict works in 4.x and 5.x.
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    with mlflow.start_run():
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="feature-extraction",
            registered_model_name="tiny_bert",
            pip_requirements=[],
        )
    work = tmp_path / "mlflow_bert"
    # execute
    art = convert_source("models:/tiny_bert/1", work, ConvertOptions())
    # assert
    assert (work / "model.onnx").is_file()
    assert art.provenance.step is not None
    assert art.provenance.step.config["mlflow_flavor"] == "transformers"
    assert art.provenance.step.config["inner_format"] == "huggingface"
    inputs = {s.name: s for s in art.signature.inputs}
    assert sorted(inputs) == ["attention_mask", "input_ids", "token_type_ids"]
    assert inputs["input_ids"].shape == ["batch", "sequence"]
    assert inputs["input_ids"].value_range == [0, 100]
    assert [(o.name, o.shape) for o in art.signature.outputs] == [
        ("last_hidden_state", ["batch", "sequence", 32]),
        ("pooler_output", ["batch", 32]),
    ]
    # the tokenizer MLflow logged apart (components/tokenizer) travels with the ONNX model
    assert art.provenance.step.config["tokenizer"] is True
    assert art.assets["tokenizer"] == str(work / "tokenizer")
    reloaded = transformers.AutoTokenizer.from_pretrained(art.assets["tokenizer"])
    assert reloaded("the cat sat")["input_ids"] == tokenizer("the cat sat")["input_ids"]
    verification = json.loads((work / "convert_config.json").read_text())["verification"]
    assert verification["runner"] == "pytorch-eager"
    assert _max_abs(work) < 1e-4
