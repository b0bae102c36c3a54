"""A decoder loop over two ONNX Runtime sessions: greedy and beam search for encoder-decoders.

The graphs come from ``tasks/convert/seq2seq_export.py``: ``encoder.onnx`` returns every decoder
layer's cross-attention keys/values once per request; ``decoder_with_past.onnx`` takes one token
per row plus the self keys/values so far and returns logits and the self keys/values grown by one.
Search follows transformers' ``generate()`` (greedy; vectorised beam search with
``early_stopping=False``) so outputs can be compared token for token.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bladeflow.core.contract import SessionConfig
from bladeflow.core.errors import DataError, ModelFileError, UserInputError
from bladeflow.core.runtime import make_session

SPEC_FILE = "seq2seq.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder_with_past.onnx"
_NEG = -1.0e9  # transformers' "impossible" score; same constant so ties break the same way


@dataclass(frozen=True)
class Seq2SeqSpec:
    """What the generation loop needs to know about an exported encoder-decoder."""

    kind: str  # "text" (input_ids + attention_mask) or "speech" (input_features)
    model_type: str
    encoder_inputs: list[str]
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    decoder_start_token_id: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("text", "speech"):
            raise UserInputError(f"seq2seq kind must be 'text' or 'speech', not {self.kind!r}")
        if self.num_layers < 1 or self.num_heads < 1 or self.head_dim < 1:
            raise UserInputError("seq2seq spec needs num_layers, num_heads and head_dim >= 1")

    def past_names(self) -> list[str]:
        return [f"past.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def cross_names(self) -> list[str]:
        return [f"cross.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def decoder_inputs(self) -> list[str]:
        mask = ["encoder_attention_mask"] if self.kind == "text" else []
        return ["input_ids", *mask, *self.past_names(), *self.cross_names()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> Seq2SeqSpec:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelFileError(f"cannot read the seq2seq description {path}: {exc}") from exc


@dataclass(frozen=True)
class StepTimes:
    """Where one generate() call's time went (seconds)."""

    encoder_s: float
    steps_s: list[float]  # decoder steps in order; [0] runs on an empty self-attention cache


class Generator:
    """Greedy and beam search over an exported encoder and decoder-with-past.

    Args:
        folder: Holds ``encoder.onnx``, ``decoder_with_past.onnx`` and ``seq2seq.json``.
        config: Session settings for both graphs (threads, providers, spinning).
        io_binding: Feed each step's present keys/values back as ONNX Runtime values through
            IOBinding instead of round-tripping them through numpy (greedy only).
    """

    def __init__(
        self, folder: str | Path, config: SessionConfig | None = None, io_binding: bool = False
    ):
        root = Path(folder)
        for name in (ENCODER_FILE, DECODER_FILE, SPEC_FILE):
            if not (root / name).is_file():
                raise ModelFileError(
                    f"{root} has no {name}; export the model with the seq2seq converter first"
                )
        self.spec = Seq2SeqSpec.load(root / SPEC_FILE)
        self.encoder = make_session(root / ENCODER_FILE, config)
        self.decoder = make_session(root / DECODER_FILE, config)
        self.io_binding = io_binding

    # -- public -------------------------------------------------------------------------------

    def generate(
        self,
        inputs: dict[str, np.ndarray],
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
    ) -> np.ndarray:
        """Token ids ``(batch, 1 + generated)``, starting with the decoder start token.

        Rows that stop early (EOS) are padded with ``pad_token_id``, as transformers does.
        """
        if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
            raise UserInputError(
                f"need 0 <= min_new_tokens ({min_new_tokens}) <= max_new_tokens "
                f"({max_new_tokens}) and max_new_tokens >= 1"
            )
        if num_beams < 1:
            raise UserInputError(f"num_beams must be >= 1, not {num_beams}")
        feeds = self._check_inputs(inputs)
        cross = self._encode(feeds)
        mask = feeds.get("attention_mask")
        if num_beams == 1:
            return self._greedy(cross, mask, max_new_tokens, min_new_tokens)
        return self._beam(cross, mask, max_new_tokens, min_new_tokens, num_beams, length_penalty)

    def teacher_forced_logits(
        self, inputs: dict[str, np.ndarray], tokens: np.ndarray
    ) -> np.ndarray:
        """Logits ``(batch, steps, vocab)`` when ``tokens[:, s]`` is fed at step ``s``."""
        feeds = self._check_inputs(inputs)
        cross = self._encode(feeds)
        past = self._empty_past(len(tokens))
        steps = []
        for s in range(tokens.shape[1]):
            logits, past = self._step(
                tokens[:, s : s + 1].astype(np.int64), feeds.get("attention_mask"), past, cross
            )
            steps.append(logits)
        return np.stack(steps, axis=1)

    def step_times(self, inputs: dict[str, np.ndarray], new_tokens: int) -> StepTimes:
        """Greedy decoding of exactly ``new_tokens`` (EOS suppressed), each part timed.

        The encoder pass, then every decoder step on its own clock, with the same session calls
        as :meth:`generate` (IOBinding when the generator uses it). Used by the benchmark's
        breakdown: encoder, first step (empty cache) and per-token time of later steps.
        """
        if new_tokens < 1:
            raise UserInputError(f"new_tokens must be >= 1, not {new_tokens}")
        feeds = self._check_inputs(inputs)
        start = time.perf_counter()
        cross = self._encode(feeds)
        encoder_s = time.perf_counter() - start
        mask = feeds.get("attention_mask")
        rows = cross[0].shape[0]
        ids = np.full((rows, 1), self.spec.decoder_start_token_id, dtype=np.int64)
        bound = self._bound_stepper(mask, cross, rows) if self.io_binding else None
        past = self._empty_past(rows)
        steps = []
        for n in range(new_tokens):
            start = time.perf_counter()
            if bound is not None:
                logits = bound(ids)
            else:
                logits, past = self._step(ids, mask, past, cross)
            self._suppress_eos(logits, n, new_tokens)
            ids = logits.argmax(axis=-1)[:, None].astype(np.int64)
            steps.append(time.perf_counter() - start)
        return StepTimes(encoder_s=encoder_s, steps_s=steps)

    # -- pieces -------------------------------------------------------------------------------

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.spec.encoder_inputs if n not in inputs]
        if missing:
            raise DataError(
                f"a {self.spec.kind} seq2seq model needs inputs {self.spec.encoder_inputs}; "
                f"missing {missing}"
            )
        out: dict[str, np.ndarray] = {}
        for name in self.spec.encoder_inputs:
            value = np.asarray(inputs[name])
            out[name] = value.astype(np.float32 if name == "input_features" else np.int64)
        return out

    def _encode(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.encoder.run(self.spec.cross_names(), feeds))

    def _empty_past(self, rows: int) -> list[np.ndarray]:
        shape = (rows, self.spec.num_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.spec.num_layers)]

    def _feeds(
        self, ids: np.ndarray, mask: np.ndarray | None, past: list[Any], cross: list[Any]
    ) -> dict[str, Any]:
        feeds: dict[str, Any] = {"input_ids": ids}
        if mask is not None:
            feeds["encoder_attention_mask"] = mask
        feeds.update(zip(self.spec.past_names(), past, strict=True))
        feeds.update(zip(self.spec.cross_names(), cross, strict=True))
        return feeds

    def _step(
        self,
        ids: np.ndarray,
        mask: np.ndarray | None,
        past: list[np.ndarray],
        cross: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.decoder.run(
            ["logits", *self.spec.present_names()], self._feeds(ids, mask, past, cross)
        )
        return out[0][:, -1, :], list(out[1:])

    def _suppress_eos(self, scores: np.ndarray, generated: int, min_new: int) -> None:
        if generated < min_new:
            scores[:, self.spec.eos_token_id] = -np.inf

    def _greedy(
        self, cross: list[np.ndarray], mask: np.ndarray | None, max_new: int, min_new: int
    ) -> np.ndarray:
        spec = self.spec
        rows = cross[0].shape[0]
        # Preallocated output; finished rows keep receiving pad, as transformers does.
        tokens = np.full((rows, 1 + max_new), spec.pad_token_id, dtype=np.int64)
        tokens[:, 0] = spec.decoder_start_token_id
        done = np.zeros(rows, dtype=bool)
        step = self._bound_stepper(mask, cross, rows) if self.io_binding else None
        past: list[np.ndarray] = self._empty_past(rows)
        n = 0
        for n in range(max_new):
            ids = tokens[:, n : n + 1]
            if step is not None:
                logits = step(ids)
            else:
                logits, past = self._step(ids, mask, past, cross)
            self._suppress_eos(logits, n, min_new)
            nxt = np.where(done, spec.pad_token_id, logits.argmax(axis=-1))
            tokens[:, n + 1] = nxt
            done |= nxt == spec.eos_token_id
            if done.all():
                break
        return tokens[:, : n + 2]

    def _bound_stepper(self, mask: np.ndarray | None, cross: list[np.ndarray], rows: int) -> Any:
        """A step function that keeps the keys/values inside ONNX Runtime between steps."""
        spec = self.spec
        binding = self.decoder.io_binding()
        ids_buf = np.zeros((rows, 1), dtype=np.int64)  # rebound each step: same buffer, no alloc
        ids_value = ort.OrtValue.ortvalue_from_numpy(ids_buf)
        if mask is not None:
            binding.bind_ortvalue_input(
                "encoder_attention_mask", ort.OrtValue.ortvalue_from_numpy(mask)
            )
        for name, value in zip(spec.cross_names(), cross, strict=True):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
        for name, value in zip(spec.past_names(), self._empty_past(rows), strict=True):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
        binding.bind_ortvalue_input("input_ids", ids_value)
        outputs = ["logits", *spec.present_names()]
        keep: list[Any] = []

        def step(ids: np.ndarray) -> np.ndarray:
            ids_buf[...] = ids
            for name in outputs:
                binding.bind_output(name, "cpu")
            self.decoder.run_with_iobinding(binding)
            values = binding.get_outputs()
            keep[:] = values  # the next step reads these buffers; keep them alive
            for name, value in zip(spec.past_names(), values[1:], strict=True):
                binding.bind_ortvalue_input(name, value)
            logits: np.ndarray = values[0].numpy()[:, -1, :]
            return logits

        return step

    def _beam(
        self,
        cross: list[np.ndarray],
        mask: np.ndarray | None,
        max_new: int,
        min_new: int,
        beams: int,
        length_penalty: float,
    ) -> np.ndarray:
        spec = self.spec
        batch = cross[0].shape[0]
        vocab = spec.vocab_size
        keep = 2 * beams  # one EOS id: transformers keeps max(2, 1 + n_eos) * beams candidates
        max_len = 1 + max_new
        cross = [np.repeat(c, beams, axis=0) for c in cross]
        if mask is not None:
            mask = np.repeat(mask, beams, axis=0)
        running = np.full((batch, beams, max_len), spec.pad_token_id, dtype=np.int64)
        running[:, :, 0] = spec.decoder_start_token_id
        finished = running.copy()
        run_scores = np.zeros((batch, beams), dtype=np.float32)
        run_scores[:, 1:] = _NEG
        fin_scores = np.full((batch, beams), _NEG, dtype=np.float32)
        fin_done = np.zeros((batch, beams), dtype=bool)
        fin_lengths = np.zeros((batch, beams), dtype=np.int64)
        heuristic_open = np.ones((batch, 1), dtype=bool)
        past = self._empty_past(batch * beams)
        top_mask = np.arange(keep) < beams
        rows = np.arange(batch)[:, None]
        for cur in range(1, max_len):
            ids = running[:, :, cur - 1].reshape(-1, 1)
            logits, past = self._step(ids, mask, past, cross)
            logp = _log_softmax(logits.astype(np.float32))
            self._suppress_eos(logp, cur - 1, min_new)
            total = (logp.reshape(batch, beams, vocab) + run_scores[:, :, None]).reshape(batch, -1)
            top = _topk(total, keep)
            top_scores = np.take_along_axis(total, top, axis=1)
            src_beam, tok = top // vocab, top % vocab
            cand = running[rows, src_beam].copy()
            cand[:, :, cur] = tok
            hits = (tok == spec.eos_token_id) | (cur + 1 >= max_len)
            # Next running beams: the best candidates that did not stop.
            masked = top_scores + hits.astype(np.float32) * _NEG
            nxt = _topk(masked, beams)
            running = cand[rows, nxt]
            run_scores = np.take_along_axis(masked, nxt, axis=1)
            parent = np.take_along_axis(src_beam, nxt, axis=1)
            # Finished hypotheses: merge the top-`beams` candidates that just stopped.
            scored = top_scores / float(cur) ** length_penalty
            scored = scored + (~heuristic_open).astype(np.float32) * _NEG
            scored = scored + (~(hits & top_mask[None, :])).astype(np.float32) * _NEG
            m_seq = np.concatenate([finished, cand], axis=1)
            m_scores = np.concatenate([fin_scores, scored.astype(np.float32)], axis=1)
            m_done = np.concatenate([fin_done, hits & top_mask[None, :]], axis=1)
            m_len = np.concatenate([fin_lengths, np.full((batch, keep), cur)], axis=1)
            best = _topk(m_scores, beams)
            finished = m_seq[rows, best]
            fin_scores = np.take_along_axis(m_scores, best, axis=1)
            fin_done = np.take_along_axis(m_done, best, axis=1)
            fin_lengths = np.take_along_axis(m_len, best, axis=1)
            # Reorder the self keys/values to the parents of the surviving beams.
            flat_parent = (parent + np.arange(batch)[:, None] * beams).reshape(-1)
            past = [p[flat_parent] for p in past]
            # Stop when no running beam can beat the worst finished one (early_stopping=False).
            best_possible = run_scores[:, :1] / float(cur) ** length_penalty
            worst = np.where(fin_done, fin_scores.min(axis=1, keepdims=True), _NEG)
            heuristic_open &= np.any(best_possible > worst, axis=1, keepdims=True)
            if not heuristic_open.any() or hits.all():
                break
        out_len = 1 + int(fin_lengths[:, 0].max())
        return finished[:, 0, :out_len]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest along the last axis, best first (stable on ties)."""
    order: np.ndarray = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return order
