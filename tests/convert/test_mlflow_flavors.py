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
    from bladeflow.tasks.convert.dispatch import detect

    assert detect("models:/tiny_bert/1") == "mlflow"  # an encoder: not the seq2seq path
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


@pytest.mark.torch
def test_mlflow_transformers_encoder_decoder_is_seq2seq(tmp_path: Path, mlflow_registry: str):
    """Detection and layout only (random weights, nothing exported): an MLflow transformers
    BART-type model is format seq2seq by models:/ URI, alias, runs:/ URI and local folder, and is
    laid out as one Hugging Face folder; a logged model without its tokenizer is refused."""
    # setup
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import mlflow
    import yaml
    from mlflow import MlflowClient

    from bladeflow.core.errors import ModelFileError
    from bladeflow.tasks.convert import mlflow_transformers as mt
    from bladeflow.tasks.convert.dispatch import detect
    from bladeflow.tasks.convert.seq2seq_source import Seq2SeqConverter, is_seq2seq_folder
    from tests.generation import tiny_models as tm

    model = tm.tiny_bart()
    model.generation_config.max_new_tokens = 7
    experiment = mlflow.create_experiment("seq2seq-detect", str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        # transformers 5 has no text2text pipeline: MLflow logs a BART under text-generation
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tm.word_tokenizer()},
            name="model",
            task="text-generation",
            registered_model_name="tiny_bart_s2s",
            pip_requirements=[],
        )
    MlflowClient().set_registered_model_alias("tiny_bart_s2s", "champion", "1")
    saved = tmp_path / "saved"
    mlflow.transformers.save_model(
        {"model": model, "tokenizer": tm.word_tokenizer()},
        str(saved),
        task="text-generation",
        pip_requirements=[],
    )
    uris = [
        "models:/tiny_bart_s2s/1",
        "models:/tiny_bart_s2s@champion",
        f"runs:/{run.info.run_id}/model",
        str(saved),
    ]
    # execute
    formats = {u: detect(u) for u in uris}
    folder = mt.local_folder("models:/tiny_bart_s2s@champion")
    # assert: every spelling is seq2seq; the folder holds weights, generation config, tokenizer
    assert formats == dict.fromkeys(uris, "seq2seq")
    assert is_seq2seq_folder(folder)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert mt.local_folder("models:/tiny_bart_s2s/1") == folder  # pinned: downloaded once
    Seq2SeqConverter.precheck(str(saved))

    # setup: the same model with its tokenizer left out of the MLmodel file
    mlmodel = yaml.safe_load((saved / "MLmodel").read_text())
    mlmodel["flavors"]["transformers"]["components"] = []
    (saved / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    # execute / assert: refused from the MLmodel file, saying how to log it
    assert detect(str(saved)) == "seq2seq"
    with pytest.raises(ModelFileError, match=r"no tokenizer was logged.*log_model"):
        Seq2SeqConverter.precheck(str(saved))


@pytest.mark.torch
def test_local_mlflow_folder_of_a_decoder_only_lm_is_refused(tmp_path: Path):
    # setup: a GPT-2-type LM saved by MLflow's transformers flavor to a local folder
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import mlflow

    from bladeflow.core.errors import ModelFileError
    from bladeflow.tasks.convert.dispatch import detect
    from tests.generation import tiny_models as tm

    config = transformers.GPT2Config(
        vocab_size=tm.VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, eos_token_id=tm.EOS
    )
    saved = tmp_path / "gpt2"
    mlflow.transformers.save_model(
        {"model": transformers.GPT2LMHeadModel(config), "tokenizer": tm.word_tokenizer()},
        str(saved),
        task="text-generation",
        pip_requirements=[],
    )
    # execute / assert: the message a Hugging Face folder of it gets, naming what is supported
    with pytest.raises(ModelFileError, match=r"GPT2LMHeadModel.*not supported yet") as refused:
        detect(str(saved))
    assert "is_encoder_decoder: true" in str(refused.value)
