"""Runs a seq2seq folder's ``search.onnx``: ONNX Runtime's contrib ``BeamSearch`` op wrapping the
exported encoder and decoder-with-past (built by ``tasks/optimize/search_op.py``), so the whole
decoding loop runs in C++ in one ``session.run``.

:class:`SearchOpGenerator` answers like :meth:`bladeflow.core.generation.Generator.generate`, so
the gate, the benchmark and serving can compare and swap the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bladeflow.core.contract import SessionConfig
from bladeflow.core.errors import UserInputError
from bladeflow.core.generation import SPEC_FILE, Seq2SeqSpec

SEARCH_FILE = "search.onnx"


class SearchOpGenerator:
    """Runs a :func:`build_search_model` file like :meth:`Generator.generate` answers: token ids
    ``(batch, 1 + generated)`` starting with the decoder start token, pad after EOS."""

    def __init__(self, path: str | Path, spec: Seq2SeqSpec, config: SessionConfig | None = None):
        from bladeflow.core.runtime import make_session

        self.spec = spec
        self.session = make_session(Path(path), config)
        self.beam = any(i.name == "num_beams" for i in self.session.get_inputs())

    def generate(
        self,
        inputs: dict[str, np.ndarray],
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
    ) -> np.ndarray:
        # max/min_length count the decoder start token, as transformers' do for encoder-decoders.
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray(inputs["input_ids"], dtype=np.int32),
            "attention_mask": np.asarray(inputs["attention_mask"], dtype=np.int32),
            "max_length": np.array([1 + max_new_tokens], dtype=np.int32),
            "min_length": np.array([1 + min_new_tokens], dtype=np.int32),
            "repetition_penalty": np.array([1.0], dtype=np.float32),
        }
        if self.beam:
            feeds |= {
                "num_beams": np.array([num_beams], dtype=np.int32),
                "num_return_sequences": np.array([1], dtype=np.int32),
                "length_penalty": np.array([length_penalty], dtype=np.float32),
            }
        elif num_beams != 1:
            raise UserInputError("a GreedySearch model runs num_beams=1 only")
        seqs = np.asarray(self.session.run(["sequences"], feeds)[0], dtype=np.int64)
        if seqs.ndim == 3:
            seqs = seqs[:, 0, :]
        return _after_eos_pad(seqs, self.spec.eos_token_id, self.spec.pad_token_id)


def generate_batches(
    folder: str | Path,
    config: SessionConfig | None,
    batches: list[dict[str, np.ndarray]],
    search: dict[str, Any],
) -> list[np.ndarray]:
    """The op's tokens for each batch of a folder holding ``search.onnx``."""
    root = Path(folder)
    gen = SearchOpGenerator(root / SEARCH_FILE, Seq2SeqSpec.load(root / SPEC_FILE), config)
    return [gen.generate(feeds, **search) for feeds in batches]


def _after_eos_pad(seqs: np.ndarray, eos: int, pad: int) -> np.ndarray:
    """The op's rows in :class:`Generator`'s layout, trimmed to the longest row.

    The op's beam scorer stores a finished hypothesis *without* its EOS (as transformers' did
    before 4.x) and fills the rest of the row with ``pad_token_id``: a row that stops before
    ``max_length`` gets its EOS back where the padding starts.
    """
    out = np.full((len(seqs), seqs.shape[1] + 1), pad, dtype=np.int64)
    last = 0
    for i, row in enumerate(seqs):
        hits = np.flatnonzero(row[1:] == eos)
        pads = np.flatnonzero(row[1:] == pad)
        if len(hits):
            end = hits[0] + 2
            out[i, :end] = row[:end]
        elif len(pads):
            end = pads[0] + 2
            out[i, : end - 1] = row[: end - 1]
            out[i, end - 1] = eos
        else:
            end = len(row)
            out[i, :end] = row
        last = max(last, end)
    return out[:, :last]
