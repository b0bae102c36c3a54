"""Hugging Face transformers models from a local folder (config + weights) -> ONNX.

Exported through PyTorch with eager attention and ``dynamo=False`` (what ONNX Runtime's
transformer optimizer fuses fully), dynamic ``batch``/``sequence`` axes; the tokenizer files are
kept beside the model (``assets["tokenizer"]``) and ``input_ids`` carries ``[0, vocab_size)``.
Nothing is downloaded: the folder must hold everything (``HF_HUB_OFFLINE=1`` works).

Encoders and their classification heads are supported; the class the config declares in
``architectures`` is loaded, so a head (e.g. ``...ForSequenceClassification``) is kept.
Supported encoder-decoders are claimed first by the ``seq2seq`` format
(:mod:`bladeflow.tasks.convert.seq2seq_source`); every other generation model (decoder-only
language models, other or headless encoder-decoders) reaching this converter is refused by
:func:`refuse_generation_model`: exported one forward pass at a time it would lose the LM head or
the decoding loop, and the result would not be the model the user gave.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.base import Converter, Export, SourceRunner, check_size
from bladeflow.tasks.convert.errors import missing_framework
from bladeflow.tasks.convert.torch_common import (
    TorchRunner,
    export_module,
    first_line,
    import_torch,
)

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 8


def check_hf_folder(path: Path) -> None:
    """Without transformers: config.json must parse, and every .safetensors file must hold the
    bytes its header promises (a truncated copy does not)."""
    import json
    import struct

    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path / 'config.json'} is not readable JSON ({exc}): the model folder is incomplete"
        ) from exc
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        try:
            with weights.open("rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > min(size, 100 << 20):
                    raise ValueError(f"header length {header_len} > file size {size}")
                header = json.loads(fh.read(header_len))
            end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
            raise ModelFileError(
                f"{weights} is not a readable safetensors file ({exc}): it is truncated or "
                "corrupt; save the model again with save_pretrained()"
            ) from exc
        if 8 + header_len + end > size:
            raise ModelFileError(
                f"{weights} is truncated: its header promises {8 + header_len + end} bytes, the "
                f"file has {size}. Copy or save the model again (save_pretrained())."
            )


# Class-name endings of generation models in transformers (architectures in config.json).
GENERATION_SUFFIXES = (
    "ForConditionalGeneration",  # BART, T5, Pegasus, Marian, Whisper, ...
    "ForCausalLM",  # Llama, Mistral, Qwen, OPT, ...
    "LMHeadModel",  # GPT-2, GPT-J, CTRL, ...
    "ForSpeechSeq2Seq",
    "ForSeq2SeqLM",
    "ForVision2Seq",
    "ForImageTextToText",
)
# Class-name endings loaded as declared: encoders and heads that need one forward pass. Others
# fall back to AutoModel, the base network: pretraining checkpoints such as bert-base-uncased
# declare ...ForMaskedLM but are used as encoders, so their MLM head is left out as before.
SUPPORTED_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "EncoderModel",  # e.g. T5EncoderModel: the encoder alone
    "Model",  # the base network, e.g. BertModel
)
# Encoder classes whose folder may still carry a stray generation_config.json (older
# transformers wrote one for some of them): their declared architecture wins.
_ENCODER_SUFFIXES = (
    *SUPPORTED_SUFFIXES,
    "ForMaskedLM",
    "ForPreTraining",
    "ForMultipleChoice",
    "ForNextSentencePrediction",
)
SUPPORTED_HELP = (
    "bladeflow supports Hugging Face encoders and classifiers, exported as one forward pass: "
    "e.g. BertModel, T5EncoderModel, ...ForSequenceClassification, ...ForTokenClassification, "
    "...ForQuestionAnswering"
)


def refuse_generation_model(path: str | Path) -> None:
    """Refuse a Hugging Face folder that holds a generation model; reads config.json only.

    A generation model is declared by an ``architectures`` entry ending in one of
    :data:`GENERATION_SUFFIXES`, by ``is_encoder_decoder: true``, or by a
    ``generation_config.json`` beside the config (ignored when ``architectures`` names only
    encoder classes, e.g. ``BertForMaskedLM``: the declared class says more). No framework is
    imported: the CLI runs this before any work.

    Raises:
        ModelFileError: a generation model (exit 2), naming the architecture and what is
            supported.
    """
    import json

    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # not a readable HF folder: check_hf_folder and the loader report that
    if not isinstance(config, dict):
        return
    architectures = [str(a) for a in config.get("architectures") or []]
    model_type = str(config.get("model_type", "?"))
    generating = [a for a in architectures if a.endswith(GENERATION_SUFFIXES)]
    declared_supported = bool(architectures) and all(
        a.endswith(_ENCODER_SUFFIXES) and a not in generating for a in architectures
    )
    why = ""
    if generating:
        why = f"its config declares the generation architecture {', '.join(generating)}"
    elif config.get("is_encoder_decoder") is True:
        shown = ", ".join(architectures) or f"model_type {model_type!r}"
        why = f"its config declares an encoder-decoder ({shown}, is_encoder_decoder: true)"
    elif (folder / "generation_config.json").is_file() and not declared_supported:
        shown = ", ".join(architectures) or f"model_type {model_type!r}"
        why = f"it has a generation_config.json ({shown})"
    if why:
        raise generation_refusal(f"{folder} holds a generation model: {why}")


def generation_refusal(what: str) -> ModelFileError:
    """The exit-2 error for a generation model: ``what`` it is, then what is supported."""
    from bladeflow.tasks.convert.seq2seq_source import SUPPORTED_TYPES

    return ModelFileError(
        f"{what}. bladeflow supports generation models that are encoder-decoders with a decoder "
        f"loop: a local Hugging Face folder (or an MLflow transformers model of one: "
        f"models:/NAME/VERSION, runs:/ID/PATH) whose config.json has is_encoder_decoder: true, "
        f"model_type one of {', '.join(SUPPORTED_TYPES)}, a ...ForConditionalGeneration "
        "architecture, and its tokenizer (or feature extractor) saved beside it (format "
        "seq2seq). Decoder-only language models (...ForCausalLM, ...LMHeadModel such as GPT-2 "
        "or Llama), other encoder-decoders and base encoder-decoders without an LM head "
        "are not supported yet: exporting one forward pass would "
        f"drop the LM head or the decoding loop and register a different model. {SUPPORTED_HELP}."
    )


def declared_class(path: Path) -> str | None:
    """The supported class ``architectures`` declares (loaded instead of AutoModel), if any."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    for arch in archs or []:
        if isinstance(arch, str) and arch.endswith(SUPPORTED_SUFFIXES):
            return arch
    return None


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / w).is_file() for w in _WEIGHTS)


class _Outputs:
    """Wraps a transformers model so it takes positional inputs and returns a tuple."""

    def __init__(self, model: Any, inputs: list[str], outputs: list[str]):
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def module(self) -> Any:
        torch = import_torch("Hugging Face")
        outer = self
        module_base: Any = torch.nn.Module

        class Wrapper(module_base):
            def __init__(self) -> None:
                super().__init__()
                self.model = outer.model

            def forward(self, *args: Any) -> tuple[Any, ...]:
                result = self.model(**dict(zip(outer.inputs, args, strict=True)))
                return tuple(result[k] for k in outer.outputs)

        return Wrapper().eval()


def load(path: Path) -> tuple[Any, Any]:
    """The model in eager attention, eval mode, and its tokenizer (or None)."""
    import_torch("Hugging Face")
    try:
        import transformers
    except ImportError as exc:
        raise missing_framework("Hugging Face", "transformers", "torch", exc) from exc
    unreadable: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError)
    try:
        from safetensors import SafetensorError

        unreadable = (*unreadable, SafetensorError)
    except ImportError:  # transformers depends on safetensors; keep the basic errors
        pass
    refuse_generation_model(path)
    name = declared_class(path)
    # The declared class keeps the head (AutoModel would load the base network without it).
    cls = getattr(transformers, name, None) if name else None
    cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
    try:
        model = cls.from_pretrained(str(path), attn_implementation="eager", local_files_only=True)
    except unreadable as exc:
        raise ModelFileError(
            f"transformers cannot load the model in {path}: {first_line(exc)}"
        ) from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # a model without tokenizer files is still convertible
    return model.eval(), tokenizer


def input_names(model: Any, tokenizer: Any) -> list[str]:
    import inspect

    accepted = inspect.signature(model.forward).parameters
    wanted = list(getattr(tokenizer, "model_input_names", None) or [])
    wanted = wanted or ["input_ids", "attention_mask", "token_type_ids"]
    return [n for n in wanted if n in accepted]


def value_ranges(model: Any) -> dict[str, list[float]]:
    cfg = model.config
    ranges = {"input_ids": [0.0, float(cfg.vocab_size)]}
    if getattr(cfg, "type_vocab_size", None):
        ranges["token_type_ids"] = [0.0, float(cfg.type_vocab_size)]
    return ranges


class HuggingFaceConverter(Converter):
    """Converts a local Hugging Face transformers model folder to ONNX via PyTorch."""

    format = "huggingface"
    description = "a Hugging Face transformers model folder (config.json + safetensors weights)"

    @classmethod
    def claims(cls, source: str) -> bool:
        return Path(source).is_dir() and is_hf_folder(Path(source))

    @classmethod
    def precheck(cls, source: str) -> None:
        check_size(source)
        check_hf_folder(Path(source))
        refuse_generation_model(source)

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        torch = import_torch(self.format)
        path = Path(source)
        model, tokenizer = load(path)
        names = input_names(model, tokenizer)
        ranges = value_ranges(model)
        gen = torch.Generator().manual_seed(0)
        example: dict[str, Any] = {}
        for name in names:
            shape = options.input_shapes.get(name, [_EXAMPLE_BATCH, _EXAMPLE_SEQ])
            if name in ranges:
                example[name] = torch.randint(0, int(ranges[name][1]), shape, generator=gen)
            elif "mask" in name:
                example[name] = torch.ones(shape, dtype=torch.int64)
            else:
                example[name] = torch.zeros(shape, dtype=torch.int64)
        with torch.inference_mode():
            sample = model(**example)
        outputs = [k for k, v in sample.items() if isinstance(v, torch.Tensor)]
        wrapped = _Outputs(model, names, outputs).module()
        out = workdir / "exported.onnx"
        _, config = export_module(wrapped, example, out, options, self.format, outputs)
        assets: dict[str, Path] = {}
        files = [path / f for f in _TOKENIZER_FILES if (path / f).is_file()]
        if files:
            folder = workdir / "tokenizer-src"
            folder.mkdir()
            for f in files:
                shutil.copy2(f, folder / f.name)
            assets["tokenizer"] = folder
        config.update(
            {
                "model_class": type(model).__name__,
                "attn_implementation": "eager",
                "model_type": model.config.model_type,
                "tokenizer": bool(files),
            }
        )
        return Export(
            onnx_path=out,
            runner=TorchRunner(wrapped, names, outputs, name="pytorch-eager"),
            config=config,
            value_ranges={k: v for k, v in ranges.items() if k in names},
            assets=assets,
        )

    def open_runner(
        self, source: str, options: ConvertOptions, artifact: ModelArtifact
    ) -> SourceRunner | None:
        model, _ = load(Path(source))
        names = [i.name for i in artifact.signature.inputs]
        outputs = [o.name for o in artifact.signature.outputs]
        return TorchRunner(_Outputs(model, names, outputs).module(), names, outputs)
