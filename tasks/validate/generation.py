"""The accuracy gate of generation models: the ONNX decoder loop against ``source.generate()``.

Both run the same search (the model's generation config) on the user's data. Per candidate:

- exact sequence match rate: generated tokens equal the source's up to and including EOS;
- token agreement: share of the source's generated tokens the candidate has at the same position;
- first divergence: the generated position where a sequence first differs (none when equal);
- teacher-forced top-1 agreement and logits error: both fed the source's own tokens step by step,
  so numeric drift (small logit error, same top-1) tells apart from a different choice that then
  compounds over the following steps;
- with reference texts (labels: a ``labels`` string array in the ``.npz``, or ``--labels-column``),
  the task metric of the source and of the candidate on the decoded text: WER and CER for speech,
  chrF for text (:mod:`bladeflow.tasks.validate.text_metrics`).

fp32 candidates must reproduce the source's greedy output exactly on ``min_exact_match`` (99%) of
the samples; reduced-precision ones are judged by the agreement budget of the policy, and every
candidate by ``max_metric_drop`` when one is set (``--accuracy metric_drop<=D``) and labels exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from bladeflow.core.contract import AccuracyReport, OutputAccuracy, SessionConfig
from bladeflow.core.errors import DataError
from bladeflow.core.outcome import Status
from bladeflow.tasks.validate.text_metrics import HIGHER_IS_BETTER, task_metrics

BATCH = 8  # rows per generate() call in validation


class GenerationSettings(BaseModel):
    """The search both sides run (from the model's generation config)."""

    max_new_tokens: int = Field(32, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    num_beams: int = Field(1, ge=1)
    length_penalty: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class GenerationPolicy(BaseModel):
    """When a generation candidate passes."""

    min_exact_match: float = Field(
        0.99, ge=0, le=1, description="fp32: share of samples whose output equals the source's"
    )
    reduced_min_token_agreement: float = Field(
        0.95, ge=0, le=1, description="reduced precision: share of the source's tokens reproduced"
    )
    reduced_min_teacher_forced_top1: float = Field(
        0.98, ge=0, le=1, description="reduced precision: teacher-forced top-1 agreement"
    )
    max_metric_drop: float | None = Field(
        None,
        ge=0,
        description="with labels: how much worse than the source's the task metric may be, as a "
        "fraction (WER/CER up by at most D; chrF down by at most 100*D points); None: only "
        "reported",
    )


class GenerationAccuracy(BaseModel):
    """Sequence-level and teacher-forced agreement of one candidate with the source."""

    samples: int
    exact_match_rate: float
    token_agreement: float
    first_divergence: list[int | None] = Field(
        description="per sample, the generated position (1 = first new token) of the first "
        "difference; null when the sequences are equal"
    )
    teacher_forced_top1: float
    teacher_forced_max_abs: float
    task: dict[str, float] = Field(
        default_factory=dict,
        description="with labels: the candidate's task metrics on its decoded text (wer/cer for "
        "speech, chrf for text)",
    )
    source_task: dict[str, float] = Field(
        default_factory=dict, description="the same metrics of the source's generate() output"
    )

    @property
    def diverged(self) -> int:
        return sum(d is not None for d in self.first_divergence)

    def metric_drops(self) -> dict[str, float]:
        """Per task metric, how much worse the candidate is than the source (0-1 scale;
        negative: better)."""
        out = {}
        for name, value in self.task.items():
            src = self.source_task.get(name)
            if src is None:
                continue
            if HIGHER_IS_BETTER[name]:
                out[name] = (src - value) / 100.0  # chrF is on 0-100
            else:
                out[name] = value - src
        return out

    def metrics(self) -> dict[str, float]:
        first = [d for d in self.first_divergence if d is not None]
        return {
            "exact_match_rate": self.exact_match_rate,
            "token_agreement": self.token_agreement,
            "teacher_forced_top1": self.teacher_forced_top1,
            "teacher_forced_max_abs": self.teacher_forced_max_abs,
            "first_divergence_min": float(min(first)) if first else -1.0,
            **self.task,
            **{f"source_{k}": v for k, v in self.source_task.items()},
            **{f"{k}_drop": v for k, v in self.metric_drops().items()},
        }


# -- data ------------------------------------------------------------------------------------


def load_inputs(
    data: str | None,
    kind: str,
    tokenizer_dir: str | Path,
    text_column: str | None = None,
    max_rows: int = 256,
    feature_shape: tuple[int, int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Batches of encoder inputs from the user's data.

    Text models: ``.jsonl``/``.csv``/``.parquet`` with a text column (``text_column``, else the
    only text column), tokenized with the model's own tokenizer and padded per batch. Speech
    models: a ``.npz`` with ``input_features`` (samples, mel bins, frames), of the encoder's
    ``feature_shape`` (mel bins, frames) when given.

    Raises:
        DataError: no data, a missing/ambiguous column, or features of the wrong shape.
    """
    path = check_data(data)
    if kind == "speech":
        return _feature_batches(path, max_rows, feature_shape)
    texts = read_texts(path, text_column)[:max_rows]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    out = []
    for start in range(0, len(texts), BATCH):
        enc = tok(texts[start : start + BATCH], padding=True, truncation=True, return_tensors="np")
        out.append(
            {
                "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
                "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
            }
        )
    return out


def check_data(data: str | None) -> Path:
    """The data file, before any work: generation models need real inputs.

    Raises:
        DataError: no data given, or the file does not exist.
    """
    if not data:
        raise DataError(
            "generation models are validated on real inputs: give --data (a .jsonl/.csv with a "
            "text column for text models, a .npz with input_features for speech models)"
        )
    path = Path(data)
    if not path.is_file():
        raise DataError(f"validation data {data} does not exist")
    return path


def load_references(
    data: str | None, kind: str, labels_column: str | None = None, max_rows: int = 256
) -> list[str] | None:
    """The reference texts (labels) of the data, row for row with :func:`load_inputs`, or None.

    Speech ``.npz``: the string array ``labels_column`` (default ``labels``, used when present).
    Text tables: the column ``labels_column`` (only when given).

    Raises:
        DataError: a named labels array/column that is missing or holds no strings.
    """
    path = check_data(data)
    if kind != "speech":
        if labels_column is None:
            return None
        return read_table(path, None, labels_column)[1]
    name = labels_column or "labels"
    try:
        with np.load(path, allow_pickle=False) as npz:
            if name not in npz.files:
                if labels_column:
                    raise DataError(f"{path} has no {name!r} array for the labels ({npz.files})")
                return None
            raw = npz[name]
            feats = len(npz["input_features"]) if "input_features" in npz.files else len(raw)
    except ValueError as exc:  # an object array: np.save pickled it
        raise DataError(
            f"{path}: {name!r} must be an array of strings (np.array([...]) of str, saved "
            f"without pickle): {exc}"
        ) from exc
    if raw.dtype.kind != "U" or raw.ndim != 1 or len(raw) != feats:
        raise DataError(
            f"{path}: {name!r} must hold one string (the transcript) per input_features row: "
            f"got dtype {raw.dtype}, shape {raw.shape} for {feats} rows"
        )
    return [str(v) for v in raw[:max_rows]]


def read_texts(path: Path, column: str | None) -> list[str]:
    """The non-empty strings of one column of a table file."""
    return read_table(path, column)[0]


def read_table(
    path: Path, column: str | None, labels_column: str | None = None
) -> tuple[list[str], list[str] | None]:
    """The non-empty strings of the text column and, with ``labels_column``, the labels of the
    same rows (empty labels as "")."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            frame = pd.read_json(path, lines=True)
        elif suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(
                f"validation data {path}: a text generation model takes .jsonl, .csv or .parquet "
                "with a text column"
            )
    except ValueError as exc:
        raise DataError(f"validation data {path} is not a readable table: {exc}") from exc
    # pandas 3 reads strings as a string dtype, older versions as object
    texts = [
        c
        for c in frame.columns
        if c != labels_column
        and (frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c]))
    ]
    if column is None:
        if len(texts) != 1:
            raise DataError(
                f"validation data {path}: name the text column with --text-column (text columns: "
                f"{texts})"
            )
        column = str(texts[0])
    if column not in frame.columns:
        raise DataError(f"validation data {path} has no column {column!r} ({list(frame.columns)})")
    keep = [isinstance(v, str) and bool(v.strip()) for v in frame[column].tolist()]
    values = [str(v) for v, k in zip(frame[column].tolist(), keep, strict=True) if k]
    if not values:
        raise DataError(f"validation data {path}: column {column!r} holds no text")
    if labels_column is None:
        return values, None
    if labels_column not in frame.columns:
        raise DataError(
            f"validation data {path} has no labels column {labels_column!r} ({list(frame.columns)})"
        )
    labels = frame[labels_column].tolist()
    return values, [v if isinstance(v, str) else "" for v, k in zip(labels, keep, strict=True) if k]


def _feature_batches(
    path: Path, max_rows: int, shape: tuple[int, int] | None = None
) -> list[dict[str, np.ndarray]]:
    if path.suffix.lower() != ".npz":
        raise DataError(f"validation data {path}: a speech model takes a .npz with input_features")
    with np.load(path, allow_pickle=False) as npz:
        if "input_features" not in npz.files:
            raise DataError(f"{path} has no input_features array ({npz.files})")
        feats = np.asarray(npz["input_features"], dtype=np.float32)[:max_rows]
    if feats.ndim != 3 or not np.isfinite(feats).all():
        raise DataError(f"{path}: input_features must be finite (samples, mel bins, frames)")
    if shape is not None and tuple(feats.shape[1:]) != shape:
        raise DataError(
            f"{path}: input_features has (mel bins, frames) = {tuple(feats.shape[1:])}, the "
            f"model's encoder takes {shape} (pad or cut the log-mel frames to that length, as "
            "the model's feature extractor does)"
        )
    return [{"input_features": feats[i : i + BATCH]} for i in range(0, len(feats), BATCH)]


# -- metrics ---------------------------------------------------------------------------------


def until_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """The start token and the generated tokens up to and including the first EOS."""
    hits = np.flatnonzero(tokens[1:] == eos)
    return tokens[: hits[0] + 2] if len(hits) else tokens


def compare(
    candidate: list[np.ndarray],
    reference: list[np.ndarray],
    cand_logits: list[np.ndarray],
    ref_logits: list[np.ndarray],
    eos: int,
) -> GenerationAccuracy:
    """Sequence and teacher-forced metrics over batches.

    Args:
        candidate: Per batch, the candidate's tokens ``(rows, 1 + new)``.
        reference: Per batch, the source's tokens ``(rows, 1 + new)``.
        cand_logits: Per batch, the candidate's logits ``(rows, steps, vocab)`` when fed the
            source's tokens (step ``s`` predicts token ``s + 1``).
        ref_logits: The source's logits on its own tokens, same layout.
        eos: The EOS token id.
    """
    exact: list[bool] = []
    first: list[int | None] = []
    agree = total = top1_hits = top1_total = 0
    max_abs = 0.0
    for cand, ref, cl, rl in zip(candidate, reference, cand_logits, ref_logits, strict=True):
        for row in range(len(ref)):
            r, c = until_eos(ref[row], eos), until_eos(cand[row], eos)
            exact.append(bool(np.array_equal(r, c)))
            width = min(len(r), len(c))
            same = r[:width] == c[:width]
            diff = np.flatnonzero(~same)
            if len(diff):
                first.append(int(diff[0]))
            elif len(r) != len(c):
                first.append(width)
            else:
                first.append(None)
            agree += int(same[1:].sum())
            total += len(r) - 1
            steps = len(r) - 1  # logits of steps 0..len-2 predict the reference's tokens
            a, b = cl[row, :steps], rl[row, :steps]
            top1_hits += int((a.argmax(-1) == b.argmax(-1)).sum())
            top1_total += steps
            if steps:
                max_abs = max(max_abs, float(np.max(np.abs(a - b))))
    n = len(exact)
    return GenerationAccuracy(
        samples=n,
        exact_match_rate=float(np.mean(exact)) if n else 0.0,
        token_agreement=agree / total if total else 1.0,
        first_divergence=first,
        teacher_forced_top1=top1_hits / top1_total if top1_total else 1.0,
        teacher_forced_max_abs=max_abs,
    )


def judge(
    name: str,
    acc: GenerationAccuracy,
    reduced_precision: bool,
    policy: GenerationPolicy | None = None,
) -> AccuracyReport:
    """The gate's verdict as an :class:`AccuracyReport` with one output, ``token_ids``.

    The contract's fields carry the generation numbers: ``max_abs_error`` is the teacher-forced
    logit error, ``min_cosine`` the exact sequence match rate, ``mean_cosine`` the token
    agreement, ``failing_samples`` the sequences that differ; ``reason`` spells them out.
    """
    policy = policy or GenerationPolicy()
    why = []
    if reduced_precision:
        if acc.token_agreement < policy.reduced_min_token_agreement:
            why.append(
                f"token agreement {acc.token_agreement:.3f} < {policy.reduced_min_token_agreement}"
            )
        if acc.teacher_forced_top1 < policy.reduced_min_teacher_forced_top1:
            why.append(
                f"teacher-forced top-1 agreement {acc.teacher_forced_top1:.3f} < "
                f"{policy.reduced_min_teacher_forced_top1}"
            )
    elif acc.exact_match_rate < policy.min_exact_match:
        firsts = sorted(d for d in acc.first_divergence if d is not None)[:5]
        why.append(
            f"exact sequence match {acc.exact_match_rate:.3f} < {policy.min_exact_match} "
            f"({acc.diverged}/{acc.samples} samples differ; first differences at generated "
            f"positions {firsts}; teacher-forced top-1 {acc.teacher_forced_top1:.4f})"
        )
    drops = acc.metric_drops()
    if policy.max_metric_drop is not None:
        for name, drop in drops.items():
            if drop > policy.max_metric_drop:
                why.append(
                    f"{name} {acc.task[name]:.4g} vs the source's {acc.source_task[name]:.4g}: "
                    f"worse by {drop:.4f} > metric_drop {policy.max_metric_drop}"
                )
    passed = not why
    summary = (
        f"exact match {acc.exact_match_rate:.3f}, token agreement {acc.token_agreement:.3f}, "
        f"teacher-forced top-1 {acc.teacher_forced_top1:.4f}, max logit error "
        f"{acc.teacher_forced_max_abs:.3g} on {acc.samples} samples"
    )
    if acc.task:
        shown = ", ".join(
            f"{k} {v:.4g} (source {acc.source_task.get(k, float('nan')):.4g})"
            for k, v in acc.task.items()
        )
        summary += f"; against the labels: {shown}"
    out = OutputAccuracy(
        max_abs_error=acc.teacher_forced_max_abs,
        max_rel_error=0.0,
        min_cosine=acc.exact_match_rate,
        mean_cosine=acc.token_agreement,
        samples=acc.samples,
        failing_samples=acc.diverged,
    )
    return AccuracyReport(
        candidate=name,
        passed=passed,
        outputs={"token_ids": out},
        reason=summary if passed else "; ".join(why) + f" ({summary})",
        synthetic_data=False,
        status=Status.OK if passed else Status.FAILED,
    )


# -- running a candidate ---------------------------------------------------------------------


def run_candidate(
    folder: str | Path,
    session: SessionConfig,
    batches: list[dict[str, np.ndarray]],
    references: list[np.ndarray],
    settings: GenerationSettings,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The candidate's own tokens and its teacher-forced logits on the source's tokens."""
    from bladeflow.core.generation import Generator

    gen = Generator(folder, session)
    tokens, logits = [], []
    for feeds, ref in zip(batches, references, strict=True):
        tokens.append(gen.generate(feeds, **settings.kwargs()))
        logits.append(gen.teacher_forced_logits(feeds, ref[:, :-1]))
    return tokens, logits


# -- task metrics against reference texts ------------------------------------------------------


def decode_texts(tokenizer_dir: str | Path, tokens: list[np.ndarray], eos: int) -> list[str]:
    """Generated text per row: the tokens after the start token up to EOS, special tokens
    skipped (what serving answers as ``text``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    rows = [until_eos(row, eos)[1:].tolist() for batch in tokens for row in batch]
    return [str(t) for t in tok.batch_decode(rows, skip_special_tokens=True)]


def score_texts(
    kind: str,
    tokenizer_dir: str | Path,
    tokens: list[np.ndarray],
    references: list[str],
    eos: int,
) -> dict[str, float]:
    """WER/CER (speech) or chrF (text) of the generated ``tokens`` against ``references``.

    Raises:
        DataError: fewer/more references than generated rows.
    """
    texts = decode_texts(tokenizer_dir, tokens, eos)
    if len(texts) != len(references):
        raise DataError(f"{len(references)} labels for {len(texts)} validation samples")
    return task_metrics(kind, references, texts)
