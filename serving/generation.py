"""A registered generation model (encoder-decoder folder), loaded for serving.

It answers the same calls as :class:`bladeflow.serving.model.LoadedVersion`, so the request path
is unchanged: ``text`` (BYTES) in, tokenized with the version's tokenizer (text models), or
``input_features`` (FP32, ``(batch, mel bins, frames)``, speech models); the batch runs
bladeflow's decoder loop (:class:`bladeflow.core.generation.Generator`); out come ``text`` (BYTES,
decoded), ``token_ids`` (INT64, the generated ids padded with the pad id) and ``lengths`` (INT64,
generated tokens per row, EOS included). Request ``parameters`` ``max_new_tokens`` and
``num_beams`` (within :class:`GenerationLimits`) travel with the request as one-value-per-row
inputs, so the batcher keeps them with their rows; a merged batch runs one ``generate()`` per
distinct setting. Batches are formed as for any model; sequences do not join a running loop
between steps (no continuous batching yet): each batch's generate() runs on the executor.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bladeflow.core.contract import SessionConfig
from bladeflow.core.generation import Generator, Seq2SeqSpec
from bladeflow.core.search_op import SEARCH_FILE, SearchOpGenerator
from bladeflow.serving.codec import DecodeError, InputMeta
from bladeflow.serving.model import LoadedVersion

PARAMETERS = ("max_new_tokens", "num_beams")
OUTPUTS = ("text", "token_ids", "lengths")


@dataclass(frozen=True)
class GenerationLimits:
    """What a request may ask for."""

    max_new_tokens: int = 256
    max_beams: int = 8


class GenerationInputs(dict[str, InputMeta]):
    """The model inputs a request sends (iteration, ``in``, ``len``), plus, for the batcher's
    merge (``[name]``), the per-row search parameters the request path adds after decoding."""

    def __init__(self, inputs: dict[str, InputMeta], hidden: dict[str, InputMeta]):
        super().__init__(inputs)
        self.hidden = hidden

    def __missing__(self, key: str) -> InputMeta:
        return self.hidden[key]


class GenerationVersion(LoadedVersion):
    """A :class:`Generator` for one model version plus what the request path needs (the
    calls of :class:`LoadedVersion`; its single ONNX Runtime session is not built)."""

    def __init__(
        self,
        name: str,
        version: str,
        folder: Path,
        session_config: SessionConfig,
        limits: GenerationLimits | None = None,
    ):  # no super().__init__(): that loads one model.onnx, a generation folder has two graphs
        self.name = name
        self.version = version
        self.session_config = session_config
        self.limits = limits or GenerationLimits()
        self.generator = Generator(folder, session_config)
        spec = self.generator.spec
        # a version registered as ORT's BeamSearch op candidate is served by that op, the way it
        # was validated and benchmarked (its encoder/decoder graphs stay for the spec)
        self.search: SearchOpGenerator | None = (
            SearchOpGenerator(folder / SEARCH_FILE, spec, session_config)
            if (folder / SEARCH_FILE).is_file()
            else None
        )
        self.defaults = _defaults(folder)
        metas = {n: _input_meta(n, spec) for n in spec.encoder_inputs}
        hidden = {p: InputMeta(p, "int64", ("batch",)) for p in PARAMETERS}
        self.inputs = GenerationInputs(metas, hidden)
        tok = folder / "tokenizer"
        # decode_dir turns generated ids into text (text and speech models); tokenizer_dir, which
        # the request path reads as "accepts BYTES text in", only for text models: a speech
        # model takes input_features.
        self.decode_dir: Path | None = tok if (tok / "tokenizer_config.json").is_file() else None
        self.tokenizer_dir: Path | None = self.decode_dir if spec.kind == "text" else None
        self.output_names = list(OUTPUTS) if self.decode_dir else ["token_ids", "lengths"]
        self.output_shapes: dict[str, tuple[int | str | None, ...]] = {
            "text": ("batch",),
            "token_ids": ("batch", "new_tokens"),
            "lengths": ("batch",),
        }
        self.output_types = {"text": "object", "token_ids": "int64", "lengths": "int64"}
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    # -- the request path's calls ---------------------------------------------------------------

    def request_inputs(self, body: bytes, rows: int) -> dict[str, np.ndarray]:
        """The request's search parameters as one value per row (checked against the limits).

        Raises:
            DecodeError: a parameter is not a whole number within its limit.
        """
        doc = orjson.loads(body)
        params = (doc.get("parameters") or {}) if isinstance(doc, dict) else {}
        wanted = {
            "max_new_tokens": (params.get("max_new_tokens"), self.limits.max_new_tokens),
            "num_beams": (params.get("num_beams"), self.limits.max_beams),
        }
        out = {}
        for key, (value, limit) in wanted.items():
            value = self.defaults[key] if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise DecodeError(f"parameter {key!r} must be a whole number in [1, {limit}]")
            out[key] = np.full((rows,), value, dtype=np.int64)
        return out

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generate for one merged batch (one generate() per distinct search setting)."""
        rows = len(next(iter(feeds.values())))
        model_feeds = {k: v for k, v in feeds.items() if k not in PARAMETERS}
        settings = np.stack(
            [feeds.get(p, np.full(rows, self.defaults[p], dtype=np.int64)) for p in PARAMETERS],
            axis=1,
        )
        results: list[np.ndarray | None] = [None] * rows
        for combo in np.unique(settings, axis=0):
            idx = np.flatnonzero((settings == combo).all(axis=1))
            part = {k: v[idx] for k, v in model_feeds.items()}
            tokens = (self.search or self.generator).generate(
                part,
                max_new_tokens=int(combo[0]),
                num_beams=int(combo[1]),
                min_new_tokens=min(self.defaults["min_new_tokens"], int(combo[0])),
                length_penalty=self.defaults["length_penalty"],
            )
            for j, i in enumerate(idx):
                results[i] = tokens[j, 1:]  # without the decoder start token
        return self._outputs([r for r in results if r is not None])

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self._tok()(texts, padding=True, truncation=True, return_tensors="np")
        return {n: np.asarray(enc[n], dtype=np.int64) for n in self.inputs}

    def example(self, rows: int = 1, length: int = 8) -> dict[str, np.ndarray]:
        feeds = {}
        for name, meta in self.inputs.items():
            if name == "input_features":
                shape = [rows, *(d if isinstance(d, int) else length for d in meta.shape[1:])]
                feeds[name] = np.zeros(shape, dtype=np.float32)
            else:
                feeds[name] = np.ones((rows, length), dtype=np.int64)
        return feeds

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        if self.tokenizer_dir is not None:
            self.predict(self.tokenize(["warm up"]))
        elif all(isinstance(d, int) for m in self.inputs.values() for d in m.shape[1:]):
            self.predict(self.example(1))  # speech: fixed (mel, frames), zeros are valid

    def describe(self) -> dict[str, Any]:
        return {
            "inputs": [m.describe() for m in self.inputs.values()],
            "outputs": [
                InputMeta(n, self.output_types[n], self.output_shapes[n]).describe()
                for n in self.output_names
            ],
            "generation": {**self.defaults, "limits": self.limits.__dict__},
        }

    # -- pieces ---------------------------------------------------------------------------------

    def _tok(self) -> Any:
        if self.decode_dir is None:
            raise DecodeError(f"version {self.version} of {self.name!r} has no tokenizer")
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.decode_dir), local_files_only=True
                )
        return self._tokenizer

    def _outputs(self, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.generator.spec
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), spec.pad_token_id, dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        for i, r in enumerate(rows):
            hits = np.flatnonzero(r == spec.eos_token_id)
            n = int(hits[0]) + 1 if len(hits) else len(r)
            ids[i, :n] = r[:n]
            lengths[i] = n
        out = {"token_ids": ids, "lengths": lengths}
        if self.decode_dir is not None:
            texts = self._tok().batch_decode(
                [r[:n].tolist() for r, n in zip(ids, lengths, strict=True)],
                skip_special_tokens=True,
            )
            out["text"] = np.array(texts, dtype=object)
        return out


def _input_meta(name: str, spec: Seq2SeqSpec) -> InputMeta:
    """Text: token ids of any length (padded per batch). Speech: ``(batch, mel, frames)`` with
    the sizes the encoder was exported for, so a wrong shape is a 400 naming them, not an ONNX
    Runtime error."""
    if name != "input_features":
        return InputMeta(name, "int64", ("batch", "src_len"))
    mel, frames = spec.extra.get("num_mel_bins"), spec.extra.get("frames")
    return InputMeta(
        name,
        "float32",
        ("batch", int(mel) if mel else "mel", int(frames) if frames else "frames"),
    )


def _defaults(folder: Path) -> dict[str, Any]:
    """Search settings of the version: the ones it was validated with (convert_config.json)."""
    found: dict[str, Any] = {}
    config = folder / "convert_config.json"
    if config.is_file():
        found = json.loads(config.read_text()).get("config", {}).get("generation", {})
    return {
        "max_new_tokens": int(found.get("max_new_tokens", 32)),
        "min_new_tokens": int(found.get("min_new_tokens", 0)),
        "num_beams": int(found.get("num_beams", 1)),
        "length_penalty": float(found.get("length_penalty", 1.0)),
    }
