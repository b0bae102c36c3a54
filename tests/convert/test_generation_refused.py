"""Generation models bladeflow cannot run are refused with exit 2, never exported as their base:
decoder-only LMs (GPT-2), headless encoder-decoders (BartModel), supported encoder-decoders saved
without a tokenizer, MLflow transformers generation models. Supported encoder-decoders with a
tokenizer go through the seq2seq format (tests/generation/).

The folders are tiny models built from a config with random weights (``save_pretrained``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bladeflow.core.errors import ModelFileError, UserInputError
from bladeflow.tasks.convert.base import get_converter
from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source, detect
from bladeflow.tasks.convert.hf_source import HuggingFaceConverter, refuse_generation_model
from bladeflow.tasks.convert.mlflow_source import refuse_generation_flavor

pytestmark = pytest.mark.torch


def _config(family: str) -> Any:
    transformers = pytest.importorskip("transformers")
    if family == "bart":
        return transformers.BartConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
        )
    if family == "t5":
        return transformers.T5Config(
            vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=64,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )


def _save(tmp_path: Path, family: str, cls: str) -> Path:
    """A folder with ``cls`` (a transformers class name) of ``family``, random weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = tmp_path / cls
    getattr(transformers, cls)(_config(family)).eval().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("family", "cls"),
    [("bart", "BartForConditionalGeneration"), ("t5", "T5ForConditionalGeneration")],
)
def test_seq2seq_folder_without_tokenizer_is_refused(tmp_path: Path, family: str, cls: str) -> None:
    # setup: a supported encoder-decoder, saved without its tokenizer
    folder = _save(tmp_path, family, cls)
    # execute
    fmt = detect(str(folder))
    with pytest.raises(ModelFileError) as prechecked:
        get_converter(fmt).precheck(str(folder))
    with pytest.raises(ModelFileError) as converting:
        convert_source(str(folder), tmp_path / "work", ConvertOptions())
    # assert: routed to the generation path, exit 2 saying what is missing and how to add it
    assert fmt == "seq2seq"
    for exc in (prechecked.value, converting.value):
        assert exc.exit_code == 2
        assert "no tokenizer" in str(exc) and "tokenizer.save_pretrained" in str(exc)
    assert not (tmp_path / "work" / "encoder.onnx").exists()


def test_decoder_only_model_is_refused_saying_what_is_supported(tmp_path: Path) -> None:
    # setup
    folder = _save(tmp_path, "gpt2", "GPT2LMHeadModel")
    # execute
    with pytest.raises(UserInputError) as refused:
        refuse_generation_model(folder)
    with pytest.raises(ModelFileError) as converting:
        convert_source(str(folder), tmp_path / "work", ConvertOptions())
    # assert: exit 2, the architecture named, what is supported said
    assert detect(str(folder)) == "huggingface"
    for exc in (refused.value, converting.value):
        assert exc.exit_code == 2
        assert "GPT2LMHeadModel" in str(exc) and "not supported yet" in str(exc)
        assert "Decoder-only language models" in str(exc)
        assert "is_encoder_decoder: true" in str(exc) and "bart" in str(exc)  # what is supported
        assert "ForSequenceClassification" in str(exc) and "BertModel" in str(exc)
    assert not (tmp_path / "work" / "model.onnx").exists()


def test_base_encoder_decoder_is_refused_by_is_encoder_decoder(tmp_path: Path) -> None:
    # setup: BartModel has no LM head, but its forward pass still needs a decoder loop
    folder = _save(tmp_path, "bart", "BartModel")
    # execute / assert: not claimed by the seq2seq format (no LM head), refused by the HF one
    assert detect(str(folder)) == "huggingface"
    with pytest.raises(ModelFileError, match=r"is_encoder_decoder: true.*not supported yet"):
        HuggingFaceConverter.precheck(str(folder))


def test_generation_config_alone_is_refused(tmp_path: Path) -> None:
    # setup: a hand-written folder: no architectures, only a generation_config.json
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8}))
    # execute / assert
    with pytest.raises(ModelFileError, match=r"generation_config\.json"):
        refuse_generation_model(folder)
    # a declared encoder class wins over a stray generation_config.json (older transformers)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    )
    refuse_generation_model(folder)


def test_refusal_imports_no_framework_and_is_fast(tmp_path: Path) -> None:
    # setup: what the CLI preflight runs, in a fresh interpreter
    folder = tmp_path / "bart"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["BartForConditionalGeneration"], "model_type": "bart"})
    )
    code = (
        "import sys, time\n"
        "from bladeflow.core.errors import UserInputError\n"
        "from bladeflow.tasks.convert.hf_source import refuse_generation_model\n"
        "t = time.perf_counter()\n"
        "try:\n"
        f"    refuse_generation_model({str(folder)!r})\n"
        "except UserInputError as exc:\n"
        "    print('refused', type(exc).__name__)\n"
        "print(time.perf_counter() - t < 1.0)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'tensorflow') if m in sys.modules))\n"
    )
    # execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # assert
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["refused ModelFileError", "True", "[]"]


def test_cli_optimize_of_a_bart_folder_without_tokenizer_exits_2(tmp_path: Path) -> None:
    # setup
    folder = _save(tmp_path, "bart", "BartForConditionalGeneration")
    home = tmp_path / "home"
    env = {**os.environ, "BLADEFLOW_HOME": str(home)}
    for leaked in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(leaked, None)
    # execute
    out = subprocess.run(
        [sys.executable, "-m", "bladeflow.app.cli", "optimize", str(folder), "--name", "bart"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    # assert
    assert out.returncode == 2, out.stderr
    assert "encoder-decoder but no tokenizer" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (home / "mlflow.db").exists() or "bart" not in _registered(home)


def _registered(home: Path) -> list[str]:
    from mlflow import MlflowClient

    db = f"sqlite:///{home / 'mlflow.db'}"
    return [m.name for m in MlflowClient(db, db).search_registered_models()]


@pytest.mark.parametrize(
    ("conf", "needle"),
    [
        (
            {"task": "text2text-generation", "pipeline_model_type": "BartForConditionalGeneration"},
            "BartForConditionalGeneration",
        ),
        ({"task": "summarization"}, "task 'summarization'"),
        ({"task": "llm/v1/chat", "pipeline_model_type": "LlamaForCausalLM"}, "LlamaForCausalLM"),
    ],
)
def test_mlflow_generation_flavors_are_refused(conf: dict[str, str], needle: str) -> None:
    # execute / assert
    with pytest.raises(ModelFileError, match="not supported yet") as refused:
        refuse_generation_flavor(conf, "models:/gen/1")
    assert needle in str(refused.value) and "models:/gen/1" in str(refused.value)
    refuse_generation_flavor(
        {"task": "feature-extraction", "pipeline_model_type": "BertModel"}, "models:/enc/1"
    )


def test_mlflow_transformers_text_generation_is_refused(
    tmp_path: Path, mlflow_registry: str
) -> None:
    # setup
    import mlflow

    transformers = pytest.importorskip("transformers")
    folder = _save(tmp_path, "gpt2", "GPT2LMHeadModel")
    model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    tokens = ["<|endoftext|>", "a", "b", "c"]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(tokens), eos_token="<|endoftext|>"
    )
    with mlflow.start_run():
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            registered_model_name="tiny_gpt2",
            pip_requirements=[],
        )
    # execute / assert
    with pytest.raises(ModelFileError, match=r"GPT2LMHeadModel.*not supported yet"):
        convert_source("models:/tiny_gpt2/1", tmp_path / "work", ConvertOptions())


def _word_tokenizer(tokens: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_encoders_and_classifiers_still_convert(tmp_path: Path) -> None:
    # setup
    bert = _save(tmp_path, "bert", "BertModel")
    classifier = _save(tmp_path, "bert", "BertForSequenceClassification")
    encoder = _save(tmp_path, "t5", "T5EncoderModel")
    # execute
    arts = {
        f.name: convert_source(str(f), tmp_path / f"work-{f.name}", ConvertOptions())
        for f in (bert, classifier, encoder)
    }
    # assert: the declared class is exported, its head included
    outputs = {k: [o.name for o in a.signature.outputs] for k, a in arts.items()}
    assert outputs["BertModel"] == ["last_hidden_state", "pooler_output"]
    assert outputs["BertForSequenceClassification"] == ["logits"]
    assert outputs["T5EncoderModel"] == ["last_hidden_state"]
    for name, art in arts.items():
        assert art.provenance.step is not None
        assert art.provenance.step.config["model_class"] == name
