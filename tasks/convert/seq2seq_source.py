"""Hugging Face encoder-decoders (BART, mBART, Marian, T5, mT5, Pegasus, Whisper) -> two graphs.

A folder whose ``config.json`` says ``is_encoder_decoder: true`` with one of the supported model
types is exported by :mod:`bladeflow.tasks.convert.seq2seq_export` as ``encoder.onnx`` +
``decoder_with_past.onnx`` + ``seq2seq.json``, with the tokenizer (or feature extractor) in
``tokenizer/`` and the generation config in ``generation_config.json`` beside them: the folder is
the model (the optimize flow hands it to ``flows/generation.py``, registration logs it whole and
serving runs it with :class:`bladeflow.core.generation.Generator`). MLflow transformers models of
such encoder-decoders (``models:/NAME/V``, ``runs:/ID/PATH``, a local MLflow model folder) are
laid out as such a folder first by :mod:`bladeflow.tasks.convert.mlflow_transformers`.

Verified before it is kept: teacher-forced logits step by step against the source (max abs
error per step) and greedy ``generate()`` output equality on the conversion inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bladeflow.core.contract import (
    ModelArtifact,
    PassRecord,
    Provenance,
    Signature,
    TensorSpec,
)
from bladeflow.core.environment import tool_versions
from bladeflow.core.errors import ModelFileError
from bladeflow.core.generation import DECODER_FILE, ENCODER_FILE, SPEC_FILE
from bladeflow.core.hashing import sha256_path
from bladeflow.tasks.convert.base import Converter, Export, check_size, source_size
from bladeflow.tasks.convert.errors import ConversionError

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

FORMAT = "seq2seq"
TEXT_TYPES = ("bart", "mbart", "marian", "t5", "mt5", "pegasus")
SPEECH_TYPES = ("whisper",)
SUPPORTED_TYPES = (*TEXT_TYPES, *SPEECH_TYPES)
TOKENIZER_DIR = "tokenizer"  # beside the graphs: what serving turns text into ids with
GENERATION_CONFIG = "generation_config.json"
VERIFY_NEW_TOKENS = 16
LOGITS_ATOL = 1e-3  # teacher-forced logits, per step (fp32 export: ~1e-5 on the test models)
# generation_config settings bladeflow's loop does not implement: converting a model that uses
# them would register a model that generates something else than the source.
_UNSUPPORTED = {
    "no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "do_sample": False,
    "num_beam_groups": 1,
}


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_seq2seq_folder(path: Path) -> bool:
    """An HF folder with weights whose config declares a supported encoder-decoder with an LM
    head (a base ``BartModel`` has none: it stays refused by the Hugging Face converter)."""
    from bladeflow.tasks.convert.hf_source import is_hf_folder

    if not path.is_dir() or not is_hf_folder(path):
        return False
    return is_seq2seq_config(read_config(path))


def is_seq2seq_config(config: dict[str, Any]) -> bool:
    """A ``config.json`` (as a dict) of a supported encoder-decoder with an LM head."""
    archs = [str(a) for a in config.get("architectures") or []]
    head = not archs or any(a.endswith("ForConditionalGeneration") for a in archs)
    return (
        config.get("is_encoder_decoder") is True
        and config.get("model_type") in SUPPORTED_TYPES
        and head
    )


def check_processor_files(path: Path) -> None:
    """Without transformers: the folder must carry the tokenizer (text) or the feature
    extractor (speech), which serving needs to turn requests into inputs and ids into text."""
    speech = read_config(path).get("model_type") in SPEECH_TYPES
    tokenizer = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    if speech:
        # Features in, text out: the feature extractor describes the inputs, the tokenizer
        # decodes the generated ids (served text, WER/CER).
        found = (path / "preprocessor_config.json").is_file() and tokenizer
        what = "feature extractor (preprocessor_config.json) and tokenizer (tokenizer.json)"
        how = "processor.save_pretrained"
    else:
        names = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
        found = any((path / n).is_file() for n in names) or any(path.glob("*.model"))
        what, how = (
            "tokenizer (tokenizer.json / tokenizer_config.json)",
            "tokenizer.save_pretrained",
        )
    if not found:
        raise ModelFileError(
            f"{path} holds an encoder-decoder but no {what}: bladeflow needs it to turn requests "
            f"into model inputs and generated ids back into text. Save it beside the model "
            f"(`{how}('{path}')`) and run again."
        )


def generation_settings(model: Any) -> dict[str, Any]:
    """Search settings from the model's generation config, as the loop takes them.

    Raises:
        ConversionError: the config asks for something the loop does not implement.
    """
    gen = model.generation_config
    odd = {
        k: getattr(gen, k, None)
        for k, default in _UNSUPPORTED.items()
        if getattr(gen, k, None) not in (None, [], default)
    }
    if odd:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(odd.items()))
        raise ConversionError(
            f"the generation config sets {shown}, which bladeflow's decoder loop does not "
            "implement (it does greedy and beam search with min/max new tokens, EOS and length "
            "penalty). Remove those settings from generation_config.json to convert the model; "
            "otherwise the served model would not generate what the source generates."
        )
    max_new = gen.max_new_tokens or max(1, int(gen.max_length or 20) - 1)
    return {
        "max_new_tokens": int(max_new),
        "min_new_tokens": int(gen.min_new_tokens or 0),
        "num_beams": int(gen.num_beams or 1),
        "length_penalty": float(gen.length_penalty if gen.length_penalty is not None else 1.0),
    }


def conversion_inputs(model: Any, processor: Any, kind: str) -> dict[str, np.ndarray]:
    """Inputs of the conversion check: tokenized sentences (text) or noise features (speech)."""
    if kind == "speech":
        cfg = model.config
        rng = np.random.default_rng(0)
        shape = (2, cfg.num_mel_bins, 2 * cfg.max_source_positions)
        return {"input_features": rng.normal(size=shape).astype(np.float32)}
    texts = ["a short sentence to check the conversion", "and a second, longer one to pad"]
    enc = processor(texts, padding=True, return_tensors="np")
    return {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
    }


def signature(kind: str, vocab: int, mel: int = 0, frames: int | str = "frames") -> Signature:
    """What the generation model takes and gives: encoder inputs in, token ids out."""
    if kind == "speech":
        inputs = [TensorSpec(name="input_features", dtype="float32", shape=["batch", mel, frames])]
    else:
        inputs = [
            TensorSpec(
                name="input_ids",
                dtype="int64",
                shape=["batch", "src_len"],
                value_range=[0.0, float(vocab)],
            ),
            TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "src_len"]),
        ]
    out = [TensorSpec(name="token_ids", dtype="int64", shape=["batch", "tokens"])]
    return Signature(inputs=inputs, outputs=out)


def convert_seq2seq(source: str, workdir: Path, options: ConvertOptions) -> ModelArtifact:
    """Export, verify, then move the folder into ``workdir`` (nothing stays on failure).

    Returns:
        A ``ModelArtifact`` of format ``seq2seq`` whose ``path`` is ``workdir/seq2seq.json``
        (the folder is the model) and whose ``assets`` name the tokenizer folder.

    Raises:
        ModelFileError: not a readable seq2seq folder (or MLflow transformers model of one), or
            no tokenizer/feature extractor.
        ConversionError: unsupported generation settings, or the ONNX loop differs from the
            source (teacher-forced logits beyond the tolerance, or different greedy tokens).
    """
    import tempfile

    from bladeflow.core.generation import Generator
    from bladeflow.tasks.convert.mlflow_transformers import resolve_folder
    from bladeflow.tasks.convert.seq2seq_export import (
        export,
        load_seq2seq,
        load_tokenizer,
        verify,
    )

    Seq2SeqConverter.precheck(source)
    path = resolve_folder(source)  # MLflow transformers URIs: downloaded and laid out as a folder
    check_processor_files(path)
    model, processor = load_seq2seq(path)
    settings = generation_settings(model)
    workdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=workdir))
    try:
        exported = export(model, staging)
        processor.save_pretrained(staging / TOKENIZER_DIR)
        if exported.spec.kind == "speech":  # the feature extractor above; ids -> text here
            load_tokenizer(path).save_pretrained(staging / TOKENIZER_DIR)
        model.generation_config.save_pretrained(staging)
        spec = exported.spec
        inputs = conversion_inputs(model, processor, spec.kind)
        checked = verify(model, Generator(staging), inputs, max_new_tokens=VERIFY_NEW_TOKENS)
        verification = {
            "runner": "pytorch-eager generate()",
            "teacher_forced_max_abs_per_step": [round(e, 8) for e in checked.step_max_abs],
            "teacher_forced_max_abs": checked.max_abs,
            "greedy_match_rate": checked.greedy_match_rate,
            "samples": len(checked.greedy_equal),
            "logits_atol": LOGITS_ATOL,
        }
        if checked.max_abs > LOGITS_ATOL or not all(checked.greedy_equal):
            raise ConversionError(
                f"the exported decoder loop differs from {source}: teacher-forced logits max "
                f"abs error {checked.max_abs:.3g} (tolerance {LOGITS_ATOL}), greedy output "
                f"equal on {sum(checked.greedy_equal)}/{len(checked.greedy_equal)} conversion "
                "inputs. Report this with the model type; the export wrapper may not fit it."
            )
        step = PassRecord(
            name=f"convert.{FORMAT}",
            config={
                **_mlflow_provenance(source),
                "model_class": type(model).__name__,
                "model_type": spec.model_type,
                "kind": spec.kind,
                "opset": _opset(),
                "generation": settings,
                "verification": verification,
            },
        )
        (staging / "convert_config.json").write_text(
            json.dumps(step.model_dump(mode="json"), indent=2) + "\n"
        )
        for item in staging.iterdir():  # verified: move into place, replacing an older one
            target = workdir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(item), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    mel = int(spec.extra.get("num_mel_bins", 0))
    frames = int(spec.extra.get("frames", 0)) or "frames"
    spec_path = workdir / SPEC_FILE
    return ModelArtifact(
        path=str(spec_path),
        format=FORMAT,
        sha256=sha256_path(spec_path.parent / DECODER_FILE),
        size_bytes=sum(source_size(workdir / f) for f in (ENCODER_FILE, DECODER_FILE)),
        signature=signature(spec.kind, spec.vocab_size, mel, frames),
        provenance=Provenance(
            source=source,
            parent_sha256=sha256_path(path),
            step=step,
            tool_versions=tool_versions(),
        ),
        assets={TOKENIZER_DIR: str(workdir / TOKENIZER_DIR)},
    )


def _mlflow_provenance(source: str) -> dict[str, Any]:
    from bladeflow.tasks.convert.mlflow_transformers import is_mlflow_source

    return (
        {"mlflow_flavor": "transformers", "inner_format": FORMAT}
        if is_mlflow_source(source)
        else {}
    )


def _opset() -> int:
    from bladeflow.tasks.convert.seq2seq_export import OPSET

    return OPSET


class Seq2SeqConverter(Converter):
    """Exports a Hugging Face encoder-decoder as an encoder + decoder-with-past graph pair."""

    format = FORMAT
    description = (
        "a Hugging Face encoder-decoder folder (is_encoder_decoder; "
        f"{'/'.join(SUPPORTED_TYPES)}) with its tokenizer or feature extractor"
    )
    order = 40  # before the Hugging Face converter, which claims every HF folder

    @classmethod
    def claims(cls, source: str) -> bool:
        # MLflow transformers models of encoder-decoders are claimed by dispatch.detect, before
        # the mlflow converter (which claims every models:/ and runs:/ URI) would take them.
        return is_seq2seq_folder(Path(source))

    @classmethod
    def precheck(cls, source: str) -> None:
        from bladeflow.tasks.convert.hf_source import check_hf_folder
        from bladeflow.tasks.convert.mlflow_transformers import is_mlflow_source
        from bladeflow.tasks.convert.mlflow_transformers import precheck as mlflow_precheck

        check_size(source)
        if is_mlflow_source(source):  # the MLmodel file says what was logged: no download
            mlflow_precheck(source)
            return
        check_hf_folder(Path(source))
        check_processor_files(Path(source))

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        # Two graphs and a loop are not one ONNX file: dispatch.convert_source calls
        # convert_seq2seq for this format instead.
        raise ConversionError(
            "the seq2seq format is converted by convert_seq2seq (two graphs), not export()"
        )
