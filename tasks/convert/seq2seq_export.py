"""Export a Hugging Face encoder-decoder as two ONNX graphs for a decoder loop.

``encoder.onnx`` runs once per request and returns the cross-attention keys/values of every
decoder layer (computed from the encoder output, so the loop never recomputes them).
``decoder_with_past.onnx`` runs once per new token: one token per sequence, the self-attention
keys/values so far (length 0 on the first step) and the cross keys/values; it returns the logits
and the self keys/values grown by one. ``seq2seq.json`` beside them names the inputs/outputs,
the layer/head counts and the special token ids (read by :mod:`bladeflow.core.generation`).

The wrappers are written against transformers 5.x's cache API (``EncoderDecoderCache`` of a self
and a cross ``DynamicCache``); torch and transformers are imported inside functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bladeflow.core.errors import ModelFileError
from bladeflow.core.generation import SPEC_FILE, Generator, Seq2SeqSpec
from bladeflow.tasks.convert.errors import ConversionError

OPSET = 17
_TEXT_TYPES = {"bart", "mbart", "marian", "t5", "mt5", "pegasus"}
_SPEECH_TYPES = {"whisper"}


@dataclass(frozen=True)
class Seq2SeqExport:
    """What :func:`export` wrote."""

    encoder: Path
    decoder: Path
    spec_path: Path
    spec: Seq2SeqSpec


@dataclass(frozen=True)
class Seq2SeqVerification:
    """Teacher-forced and free-running agreement of the ONNX loop with the source model.

    Attributes:
        step_max_abs: Max abs logits error at each decoder step (teacher-forced on the source's
            own greedy output).
        greedy_equal: Per sample, whether the ONNX greedy tokens equal ``source.generate()``.
    """

    step_max_abs: list[float]
    greedy_equal: list[bool]

    @property
    def max_abs(self) -> float:
        return max(self.step_max_abs) if self.step_max_abs else 0.0

    @property
    def greedy_match_rate(self) -> float:
        return float(np.mean(self.greedy_equal)) if self.greedy_equal else 1.0


def load_seq2seq(folder: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer-or-feature-extractor) from a Hugging Face seq2seq folder, or from an
    MLflow transformers model of one (``models:/...``, ``runs:/...``, a local MLflow folder:
    downloaded once per process).

    Raises:
        ModelFileError: no config, not an encoder-decoder, or no tokenizer/feature extractor.
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

    from bladeflow.tasks.convert.mlflow_transformers import resolve_folder

    path = resolve_folder(folder)
    if not (path / "config.json").is_file():
        raise ModelFileError(f"{path} has no config.json; give a Hugging Face seq2seq folder")
    config = AutoConfig.from_pretrained(path)
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelFileError(
            f"{path} holds a {config.model_type!r} model, not an encoder-decoder; the seq2seq "
            "format is for models such as T5, BART, Marian or Whisper"
        )
    processor = _load_processor(path, config.model_type)
    auto = (
        AutoModelForSpeechSeq2Seq if config.model_type in _SPEECH_TYPES else AutoModelForSeq2SeqLM
    )
    model = auto.from_pretrained(path, attn_implementation="eager")
    return model.eval(), processor


def _load_processor(path: Path, model_type: str) -> Any:
    from transformers import AutoFeatureExtractor, AutoTokenizer

    speech = model_type in _SPEECH_TYPES
    loader = AutoFeatureExtractor if speech else AutoTokenizer
    what = "feature extractor (preprocessor_config.json)" if speech else "tokenizer"
    files = ["preprocessor_config.json"] if speech else ["tokenizer.json", "tokenizer_config.json"]
    if not any((path / f).is_file() for f in files) and not any(path.glob("*.model")):
        raise ModelFileError(
            f"{path} has no {what}: bladeflow needs it to turn requests into model inputs and "
            f"tokens back into text. Save it beside the model (e.g. "
            f"`{'processor' if speech else 'tokenizer'}.save_pretrained('{path}')`)."
        )
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot load the {what} of {path}: {exc}") from exc


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer of a speech folder (beside its feature extractor): what turns generated ids
    into text for serving and for WER/CER.

    Raises:
        ModelFileError: the folder has no tokenizer, or it cannot be loaded.
    """
    from transformers import AutoTokenizer

    path = Path(folder)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any((path / n).is_file() for n in names):
        raise ModelFileError(
            f"{path} holds a speech encoder-decoder but no tokenizer (tokenizer.json / "
            "tokenizer_config.json): bladeflow needs it to turn generated ids into text. Save "
            f"the whole processor beside the model (`processor.save_pretrained('{path}')`)."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot load the tokenizer of {path}: {exc}") from exc


def spec_of(model: Any) -> Seq2SeqSpec:
    """The :class:`Seq2SeqSpec` of a transformers encoder-decoder model."""
    config = model.config
    kind = "speech" if config.model_type in _SPEECH_TYPES else "text"
    if config.model_type not in _TEXT_TYPES | _SPEECH_TYPES:
        raise ConversionError(
            f"model type {config.model_type!r} is not one bladeflow's seq2seq export was tested "
            f"on ({', '.join(sorted(_TEXT_TYPES | _SPEECH_TYPES))})"
        )
    # model.config itself: get_text_config(decoder=True) returns a view with default sizes here.
    dec = config
    layers = getattr(dec, "decoder_layers", None) or getattr(dec, "num_decoder_layers", None)
    layers = layers or dec.num_layers
    heads = getattr(dec, "decoder_attention_heads", None) or dec.num_heads
    d_model = getattr(dec, "d_model", None) or dec.hidden_size
    head_dim = getattr(dec, "d_kv", None) or d_model // heads
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else config.eos_token_id
    start = gen.decoder_start_token_id
    if start is None:
        start = config.decoder_start_token_id
    if start is None or eos is None:
        raise ConversionError(
            f"{config.model_type} model has no decoder_start_token_id/eos_token_id in its config "
            "or generation_config; set them before exporting"
        )
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    encoder_inputs = ["input_features"] if kind == "speech" else ["input_ids", "attention_mask"]
    extra: dict[str, Any] = {}
    if kind == "speech":
        # The encoder adds a fixed table of positions: it takes exactly 2 * max_source_positions
        # frames (the conv stem halves them), so serving and the data check fix both dims.
        extra = {
            "num_mel_bins": int(config.num_mel_bins),
            "frames": 2 * int(config.max_source_positions),
        }
    return Seq2SeqSpec(
        kind=kind,
        model_type=config.model_type,
        encoder_inputs=encoder_inputs,
        num_layers=int(layers),
        num_heads=int(heads),
        head_dim=int(head_dim),
        vocab_size=int(config.vocab_size),
        eos_token_id=int(eos if isinstance(eos, int) else eos[0]),
        pad_token_id=int(pad),
        decoder_start_token_id=int(start),
        extra=extra,
    )


def export(source: str | Path | Any, workdir: str | Path) -> Seq2SeqExport:
    """Write ``encoder.onnx``, ``decoder_with_past.onnx`` and ``seq2seq.json`` into ``workdir``.

    Args:
        source: A Hugging Face seq2seq folder, or a loaded transformers encoder-decoder model.
        workdir: Output folder (created).
    """
    import torch

    model = load_seq2seq(source)[0] if isinstance(source, (str, Path)) else source.eval()
    _require_eager(model)
    spec = spec_of(model)
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    enc_path, dec_path = out / "encoder.onnx", out / "decoder_with_past.onnx"
    enc_wrapper, dec_wrapper = _wrappers(model, spec)
    feeds = _dummy_encoder_inputs(model, spec)
    batch, kv_axes = {0: "batch"}, {0: "batch", 2: "past_len"}
    cross_names = spec.cross_names()
    enc_axes: dict[str, dict[int, str]] = {n: dict(batch) for n in spec.encoder_inputs}
    if spec.kind == "text":
        enc_axes["input_ids"][1] = enc_axes["attention_mask"][1] = "src_len"
    for name in cross_names:
        enc_axes[name] = {0: "batch", 2: "src_len"}
    with torch.no_grad():
        torch.onnx.export(
            enc_wrapper,
            tuple(feeds[n] for n in spec.encoder_inputs),
            str(enc_path),
            input_names=spec.encoder_inputs,
            output_names=cross_names,
            dynamic_axes=enc_axes,
            opset_version=OPSET,
            dynamo=False,
        )
        cross = enc_wrapper(*(feeds[n] for n in spec.encoder_inputs))
        b = cross[0].shape[0]
        past_len = 3
        self_kv = [
            torch.randn(b, spec.num_heads, past_len, spec.head_dim)
            for _ in range(2 * spec.num_layers)
        ]
        ids = torch.full((b, 1), spec.decoder_start_token_id, dtype=torch.long)
        dec_inputs = spec.decoder_inputs()
        args: list[Any] = [ids]
        dec_axes: dict[str, dict[int, str]] = {"input_ids": dict(batch)}
        if spec.kind == "text":
            args.append(feeds["attention_mask"])
            dec_axes["encoder_attention_mask"] = {0: "batch", 1: "src_len"}
        args += [*self_kv, *cross]
        for name in spec.past_names():
            dec_axes[name] = dict(kv_axes)
        for name in cross_names:
            dec_axes[name] = {0: "batch", 2: "src_len"}
        dec_axes["logits"] = dict(batch)
        for name in spec.present_names():
            dec_axes[name] = {0: "batch", 2: "total_len"}
        torch.onnx.export(
            dec_wrapper,
            tuple(args),
            str(dec_path),
            input_names=dec_inputs,
            output_names=["logits", *spec.present_names()],
            dynamic_axes=dec_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    spec_path = out / SPEC_FILE
    spec_path.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return Seq2SeqExport(encoder=enc_path, decoder=dec_path, spec_path=spec_path, spec=spec)


def _require_eager(model: Any) -> None:
    # Traced SDPA/flash paths bake shape-dependent branches into the graph; eager attention is
    # plain matmuls that stay valid for every batch and length.
    model.config._attn_implementation = "eager"
    for sub in (model.get_encoder(), model.get_decoder()):
        sub.config._attn_implementation = "eager"


def _wrappers(model: Any, spec: Seq2SeqSpec) -> tuple[Any, Any]:
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    n = spec.num_layers
    start = spec.decoder_start_token_id
    text = spec.kind == "text"

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> tuple[Any, ...]:
            if text:
                ids, mask = inputs
                hidden = self.model.get_encoder()(input_ids=ids, attention_mask=mask)[0]
            else:
                (features,) = inputs
                mask = None
                hidden = self.model.get_encoder()(input_features=features)[0]
            # One decoder step on an empty cache fills the cross cache of every layer: the
            # generic way to get each architecture's cross keys/values (projection, scaling).
            cache = EncoderDecoderCache(
                DynamicCache(config=self.model.config), DynamicCache(config=self.model.config)
            )
            dec_ids = torch.full((hidden.shape[0], 1), start, dtype=torch.long)
            extra = {"encoder_attention_mask": mask} if text else {}
            self.model.get_decoder()(
                input_ids=dec_ids,
                encoder_hidden_states=hidden,
                cache=cache,
                use_cache=True,
                **extra,
            )
            cross: Any = cache.cross_attention_cache
            return tuple(
                t for i in range(n) for t in (cross.layers[i].keys, cross.layers[i].values)
            )

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, *rest: Any) -> tuple[Any, ...]:
            mask = rest[0] if text else None
            kv = rest[1:] if text else rest
            past, cross = kv[: 2 * n], kv[2 * n :]
            cache = EncoderDecoderCache(
                DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(n)]),
                DynamicCache([(cross[2 * i], cross[2 * i + 1]) for i in range(n)]),
            )
            past_len = past[0].shape[2]
            position = torch.arange(past_len, past_len + 1, dtype=torch.long)
            kwargs: dict[str, Any] = {
                "decoder_input_ids": ids,
                "cache": cache,
                "use_cache": True,
                # Only the cross cache is read; the encoder output itself is not needed.
                "encoder_outputs": (cross[0].new_zeros(ids.shape[0], 1, 1),),
                "cache_position": position,
            }
            if text:
                kwargs["attention_mask"] = mask
            out = self.model(**kwargs)
            selfc = out.cache.self_attention_cache
            return (
                out.logits,
                *(t for i in range(n) for t in (selfc.layers[i].keys, selfc.layers[i].values)),
            )

    return Encoder(), Decoder()


def _dummy_encoder_inputs(model: Any, spec: Seq2SeqSpec) -> dict[str, Any]:
    import torch

    if spec.kind == "speech":
        cfg = model.config
        frames = 2 * cfg.max_source_positions
        return {"input_features": torch.randn(2, cfg.num_mel_bins, frames)}
    ids = torch.randint(3, spec.vocab_size, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def verify(
    model: Any,
    generator: Generator,
    inputs: dict[str, np.ndarray],
    max_new_tokens: int = 16,
) -> Seq2SeqVerification:
    """Compare the ONNX loop with the torch model on ``inputs``.

    Teacher-forced: the source's own greedy output is fed to both, step by step, and the max abs
    logits difference of each step is recorded. Free-running: greedy tokens of both, per sample.
    """
    import torch

    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = source_generate(model, torch_inputs, max_new_tokens=max_new_tokens)
        ref_logits = model(**torch_inputs, decoder_input_ids=ref).logits.numpy()
    onnx_logits = generator.teacher_forced_logits(inputs, ref.numpy())
    steps = ref.shape[1]
    step_err = [float(np.max(np.abs(onnx_logits[:, s] - ref_logits[:, s]))) for s in range(steps)]
    ours = generator.generate(inputs, max_new_tokens=max_new_tokens)
    ref_np = ref.numpy()
    eos = generator.spec.eos_token_id
    equal = [same_tokens(ours[i], ref_np[i], eos) for i in range(len(ours))]
    return Seq2SeqVerification(step_max_abs=step_err, greedy_equal=equal)


def source_generate(model: Any, inputs: dict[str, Any], **kwargs: Any) -> Any:
    from transformers import GenerationMixin

    # Whisper's own generate() adds language/task/timestamp handling; the plain loop is what the
    # ONNX Generator reproduces.
    return GenerationMixin.generate(model, **inputs, do_sample=False, **kwargs)


def same_tokens(a: np.ndarray, b: np.ndarray, eos: int) -> bool:
    """Equal up to and including the first EOS (what follows is filler: transformers fills with
    EOS where the pad id is 0, bladeflow with the pad id)."""
    return bool(np.array_equal(_until_eos(a, eos), _until_eos(b, eos)))


def _until_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    hits = np.flatnonzero(tokens[1:] == eos)
    return tokens[: hits[0] + 2] if len(hits) else tokens


def source_outputs(
    model: Any, batches: list[dict[str, np.ndarray]], **search: Any
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The source's tokens (``generate()`` with ``search``) and its logits on those tokens
    (teacher-forced, step ``s`` predicting token ``s + 1``), per batch: the generation gate's
    reference."""
    import torch

    tokens, logits = [], []
    with torch.no_grad():
        for feeds in batches:
            inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
            out = source_generate(model, inputs, **search)
            tokens.append(out.numpy())
            logits.append(model(**inputs, decoder_input_ids=out[:, :-1]).logits.numpy())
    return tokens, logits
