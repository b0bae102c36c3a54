"""The accuracy budget: ``--accuracy`` limits, what kind each output is, and its default limits.

A budget is a short list of limits on how far a candidate may move each output of the source,
in the measure that matters for what the output is: ``cosine>=0.99`` for embeddings,
``argmax>=0.995,prob_drift<=0.02`` for classifiers, ``abs<=0.02`` or ``decision>=0.99@0.5`` for
scores and matchers, ``metric_drop<=0.005`` with labels. ``OUTPUT:`` before a limit confines it to
one output (``similarity:abs<=0.02``). :func:`parse_budget` reads one and refuses a bad one with
:class:`BudgetError`, whose message lists the accepted forms; :meth:`AccuracyBudget.to_policy`
turns it into the gate's :class:`~bladeflow.core.policy.TolerancePolicy`.

``auto`` (the default when no tolerance is given) takes each output's default from its kind,
:func:`output_kind`: classifier logits/probabilities, an embedding, a bounded score, string
labels, or a plain regression value (which keeps the exact elementwise gate).
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from bladeflow.core.errors import UserInputError
from bladeflow.core.policy import (
    PRESETS,
    MetricLimit,
    MetricName,
    OutputTolerance,
    TolerancePolicy,
)

Measure = Literal[
    "cosine", "argmax", "prob_drift", "abs", "decision", "label", "metric_drop", "exact"
]
AUTO = "auto"

ACCEPTED_FORMS = """accepted forms (comma-separated; OUTPUT: before a limit limits one output):
  cosine>=C          per-sample cosine similarity to the source (embeddings), C in [-1, 1]
  argmax>=R          share of samples whose top class agrees with the source's (classifiers)
  prob_drift<=D      largest change of any class probability, after softmax (classifiers)
  abs<=E             largest |candidate - source| of any element of a sample (scores)
  decision>=R@T      share of samples whose decision (value >= T) agrees (scores, matchers)
  label>=R           share of samples whose string label equals the source's
  metric_drop<=D     the task metric (accuracy; or f1_drop, auc_drop, spearman_drop) may drop
                     by at most D (needs labels: --labels-column)
  exact              |candidate - source| <= 1e-4 + 1e-3*|source| and cosine >= 0.999
  auto               the default for each output's kind (classifier, embedding, score, ...)
R is a share in [0, 1]; D and E are >= 0.
e.g. 'cosine>=0.99', 'argmax>=0.995,prob_drift<=0.02',
     'similarity:abs<=0.02,similarity:decision>=0.99@0.5', 'metric_drop<=0.005'"""


class BudgetError(UserInputError, ValueError):
    """An accuracy budget that cannot be read (exit 2); the message lists the accepted forms.

    A ValueError too, so a pydantic validator turns it into a validation error (the Prefect UI
    form refuses it like the CLI does).
    """


class OutputKind(StrEnum):
    """What an output is, as far as judging it goes."""

    CLASSIFIER = "classifier"  # class scores (logits) [batch, classes]
    PROBABILITIES = "probabilities"  # rows in [0, 1] summing to 1 [batch, classes]
    EMBEDDING = "embedding"  # pooled or per-token hidden states
    SCORE = "score"  # one bounded value per sample: a similarity, a probability, in [-1, 1]
    LABELS = "labels"  # string class labels
    REGRESSION = "regression"  # anything else: exact elementwise gate


# Why these numbers: argmax>=0.99 lets 1 sample in 100 change its top class (such flips happen
# only on near-ties, where the source itself was unsure) and prob_drift<=0.02 keeps every class
# probability within 2 points, so thresholds on confidences still mean what they did. Embeddings:
# cosine>=0.99 on every sample keeps nearest-neighbour rankings (measured on MiniLM: int8 with
# accuracy recovery reaches it, plain per-tensor int8 at ~0.93 does not). Scores: 0.02 is 1% of
# a [-1, 1] range. Regression values have no scale we could guess: they stay exact.
DEFAULT_BUDGETS: dict[OutputKind, str] = {
    OutputKind.CLASSIFIER: "argmax>=0.99,prob_drift<=0.02",
    OutputKind.PROBABILITIES: "argmax>=0.99,prob_drift<=0.02",
    OutputKind.EMBEDDING: "cosine>=0.99",
    OutputKind.SCORE: "abs<=0.02",
    OutputKind.LABELS: "label>=0.99",
    OutputKind.REGRESSION: "exact",
}

_RANGES: dict[str, tuple[str, float, float]] = {
    # measure -> (operator, lowest, highest value)
    "cosine": (">=", -1.0, 1.0),
    "argmax": (">=", 0.0, 1.0),
    "label": (">=", 0.0, 1.0),
    "decision": (">=", 0.0, 1.0),
    "prob_drift": ("<=", 0.0, 1.0),
    "abs": ("<=", 0.0, math.inf),
    "metric_drop": ("<=", 0.0, math.inf),
}
_METRIC_ALIASES: dict[str, MetricName] = {
    "metric_drop": "accuracy",
    "accuracy_drop": "accuracy",
    "f1_drop": "f1",
    "auc_drop": "auc",
    "spearman_drop": "spearman",
}
_LIMIT = re.compile(r"^(?P<measure>[a-z_0-9]+)\s*(?:(?P<op>>=|<=|=|<|>)\s*(?P<rest>.*))?$")
# Measures that judge numbers / labels; a limit that applies to none of an output's measures
# leaves that output to its kind's default.
_NUMERIC = {"cosine", "argmax", "prob_drift", "abs", "decision", "exact"}
_CLASSES = {"argmax", "prob_drift"}  # need [batch, classes]


class Limit(BaseModel):
    """One limit of a budget: ``[output:]measure op value[@threshold]``."""

    model_config = ConfigDict(frozen=True)

    measure: Measure
    value: float | None = None
    threshold: float | None = None  # decision: the decision is value >= threshold
    metric: MetricName | None = None  # metric_drop: which metric
    output: str | None = None

    def text(self, with_output: bool = True) -> str:
        prefix = f"{self.output}:" if with_output and self.output else ""
        if self.measure == "exact":
            return f"{prefix}exact"
        name: str = self.measure
        if self.measure == "metric_drop" and self.metric not in (None, "accuracy"):
            name = f"{self.metric}_drop"
        op = _RANGES[self.measure][0]
        at = f"@{self.threshold:g}" if self.threshold is not None else ""
        return f"{prefix}{name}{op}{self.value:g}{at}"


class AccuracyBudget(BaseModel):
    """Limits from ``--accuracy``; no limits at all means ``auto`` (defaults per output kind)."""

    model_config = ConfigDict(frozen=True)

    limits: tuple[Limit, ...] = ()

    @property
    def auto(self) -> bool:
        return not self.limits

    def text(self) -> str:
        return ",".join(lim.text() for lim in self.limits) if self.limits else AUTO

    def to_policy(self, outputs: dict[str, OutputFacts] | None = None) -> TolerancePolicy:
        """The gate policy this budget stands for, on a model with ``outputs``.

        Each output gets the budget's limits that apply to it (its own ``OUTPUT:`` limits
        replacing general ones of the same measure); an output that none applies to (a label
        output under ``cosine>=0.99``, or any output under ``auto``) gets its kind's default.

        Raises:
            BudgetError: a limit names an output the model does not have, or a measure that
                cannot judge that output (argmax on a 3-D output, cosine on labels).
        """
        outputs = outputs or {}
        named = {lim.output for lim in self.limits if lim.output is not None}
        if unknown := sorted(named - set(outputs)) if outputs else []:
            raise BudgetError(
                f"--accuracy names output(s) {unknown} the model does not have; its outputs: "
                f"{sorted(outputs)}"
            )
        general = [
            lim for lim in self.limits if lim.output is None and lim.measure != "metric_drop"
        ]
        metric = self._metric()
        per_output: dict[str, OutputTolerance] = {}
        resolved: list[Limit] = []
        for name, facts in outputs.items():
            own = [
                lim for lim in self.limits if lim.output == name and lim.measure != "metric_drop"
            ]
            for lim in own:
                if not _applies(lim, facts):
                    raise BudgetError(
                        f"--accuracy limit {lim.text()!r} cannot judge output {name!r} "
                        f"({facts.describe()})\n{ACCEPTED_FORMS}"
                    )
            mine = {lim.measure: lim for lim in general if _applies(lim, facts)}
            mine.update({lim.measure: lim for lim in own})
            chosen = list(mine.values()) or parse_budget(DEFAULT_BUDGETS[facts.kind]).limits
            resolved += [lim.model_copy(update={"output": name}) for lim in chosen]
            per_output[name] = _tolerance(chosen)
        if metric is not None:
            resolved.append(
                Limit(
                    measure="metric_drop", value=metric.max_drop, metric=metric.metric
                ).model_copy(update={"output": metric.output})
            )
        classifiers = [
            n
            for n, tol in per_output.items()
            if outputs[n].kind in (OutputKind.CLASSIFIER, OutputKind.PROBABILITIES)
            or tol.min_top1_agreement is not None
            or tol.max_prob_drift is not None
        ]
        default = _tolerance(general) if general else OutputTolerance()
        return TolerancePolicy(
            default=default,
            outputs=per_output,
            metric=metric,
            classifier_outputs=classifiers if outputs else None,
            budget=AccuracyBudget(limits=tuple(resolved)).text() if outputs else self.text(),
        )

    def _metric(self) -> MetricLimit | None:
        drops = [lim for lim in self.limits if lim.measure == "metric_drop"]
        if not drops:
            return None
        lim = drops[0]
        return MetricLimit(
            metric=lim.metric or "accuracy", output=lim.output, max_drop=lim.value or 0.0
        )


class OutputFacts(BaseModel):
    """What :meth:`AccuracyBudget.to_policy` needs to know about one output."""

    kind: OutputKind
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.kind.value}, shape {list(self.shape)}"


def _applies(lim: Limit, facts: OutputFacts) -> bool:
    if facts.kind is OutputKind.LABELS:
        return lim.measure in {"label", "exact"}
    if lim.measure == "label":
        return False
    if lim.measure in _CLASSES:
        return len(facts.shape) == 2 and facts.shape[1] >= 2
    return lim.measure in _NUMERIC


def _tolerance(limits: list[Limit] | tuple[Limit, ...]) -> OutputTolerance:
    """One output's tolerance from its limits: only what they name is judged."""
    fields: dict[str, object] = {"atol": None, "rtol": 0.0, "min_cosine": None, "mostly": 1.0}
    ordered = sorted(limits, key=lambda lim: lim.measure != "exact")  # exact first, then refine
    for lim in ordered:
        if lim.measure == "exact":
            fp32 = PRESETS["fp32"]
            fields.update(atol=fp32.atol, rtol=fp32.rtol, min_cosine=fp32.min_cosine)
        elif lim.measure == "abs":
            fields.update(atol=lim.value, rtol=0.0)
        elif lim.measure == "cosine":
            fields["min_cosine"] = lim.value
        elif lim.measure == "argmax":
            fields["min_top1_agreement"] = lim.value
        elif lim.measure == "prob_drift":
            fields["max_prob_drift"] = lim.value
        elif lim.measure == "decision":
            fields.update(min_decision_agreement=lim.value, decision_threshold=lim.threshold)
        elif lim.measure == "label":
            fields["min_label_agreement"] = lim.value
    return OutputTolerance.model_validate(fields)


def parse_budget(text: str) -> AccuracyBudget:
    """Read an ``--accuracy`` expression.

    Raises:
        BudgetError: the expression is empty, a limit has an unknown measure, the wrong
            operator or an out-of-range value, or one measure is limited twice for one output.
    """
    stripped = text.strip()
    if stripped.lower() in {AUTO, "default"}:
        return AccuracyBudget()
    if not stripped:
        raise BudgetError(f"--accuracy is empty\n{ACCEPTED_FORMS}")
    limits: list[Limit] = []
    seen: set[tuple[str | None, str]] = set()
    for item in (part.strip() for part in stripped.split(",")):
        if not item:
            raise BudgetError(
                f"--accuracy {text!r} has an empty limit (two commas)\n{ACCEPTED_FORMS}"
            )
        lim = _parse_limit(item, text)
        key = (lim.output, "metric_drop" if lim.measure == "metric_drop" else lim.measure)
        if key in seen or (
            lim.measure == "metric_drop" and any(m == "metric_drop" for _, m in seen)
        ):
            raise BudgetError(
                f"--accuracy {text!r} limits {lim.measure} twice"
                + (f" for output {lim.output!r}" if lim.output else "")
                + f": give each measure once per output\n{ACCEPTED_FORMS}"
            )
        seen.add(key)
        limits.append(lim)
    return AccuracyBudget(limits=tuple(limits))


def _parse_limit(item: str, text: str) -> Limit:
    output: str | None = None
    body = item
    if ":" in item:  # output names may hold ':' themselves (TF: 'dense/Softmax:0')
        head, _, body = item.rpartition(":")
        output = head.strip() or None
        body = body.strip()
        if output is None:
            return _bad(item, text, "nothing before ':' (write OUTPUT:LIMIT)")
    m = _LIMIT.match(body)
    if not m:
        return _bad(item, text, "not MEASURE>=VALUE or MEASURE<=VALUE")
    word, op, rest = m.group("measure"), m.group("op"), (m.group("rest") or "").strip()
    if word == "exact":
        if op is not None:
            return _bad(item, text, "'exact' takes no value")
        return Limit(measure="exact", output=output)
    metric: MetricName | None = None
    if word in _METRIC_ALIASES:
        metric, word = _METRIC_ALIASES[word], "metric_drop"
    if word not in _RANGES:
        return _bad(item, text, f"unknown measure {word!r}")
    want, low, high = _RANGES[word]
    if op != want:
        return _bad(item, text, f"{word} takes {want} (e.g. {word}{want}{_example(word)})")
    threshold: float | None = None
    value_text = rest
    if word == "decision":
        value_text, at, threshold_text = rest.partition("@")
        if not at:
            return _bad(
                item, text, "decision needs its threshold: decision>=R@T, e.g. decision>=0.99@0.5"
            )
        threshold = _number(threshold_text, item, text)
    elif "@" in rest:
        return _bad(item, text, f"only decision takes @THRESHOLD, not {word}")
    value = _number(value_text, item, text)
    if not low <= value <= high:
        span = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        return _bad(item, text, f"{word} must be {span}, got {value:g}")
    return Limit(measure=word, value=value, threshold=threshold, metric=metric, output=output)


def _example(word: str) -> str:
    return {"decision": "0.99@0.5", "cosine": "0.99", "abs": "0.02"}.get(
        word, "0.02" if _RANGES[word][0] == "<=" else "0.99"
    )


def _number(raw: str, item: str, text: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        _bad(item, text, f"{raw.strip()!r} is not a number")
    return value


def _bad(item: str, text: str, why: str) -> Limit:
    raise BudgetError(f"--accuracy {text!r}: {item!r}: {why}\n{ACCEPTED_FORMS}")


# Name hints, lower case. Classifier hints are those TolerancePolicy.is_classifier uses.
_LOGIT_HINTS = ("logit",)
_CLASS_HINTS = ("logit", "prob", "score", "class")
_EMBEDDING_HINTS = ("embed", "hidden", "pool", "sentence", "feature", "encod")
_SCORE_HINTS = ("score", "similar", "cosine", "prob", "match", "relevan", "confidence")
# Ops whose output is bounded to [0, 1] or [-1, 1] whatever their input.
BOUNDING_OPS = frozenset({"Sigmoid", "Tanh", "Softmax", "HardSigmoid", "CosineSimilarity"})


def output_kind(name: str, reference: np.ndarray, producer: str | None = None) -> OutputKind:
    """What output ``name`` is, from its name, dtype, shape and the source's values on the data.

    ``producer`` is the ONNX op that computes it (shape-only ops such as Reshape looked through),
    when known. 2-D outputs are called classifiers or embeddings only by their name (``logits``,
    ``probabilities``, ``pooled``, ``sentence_embedding``) or by their values (rows of
    probabilities): an unnamed ``[batch, n]`` output stays a regression value, judged exactly.
    """
    ref = np.asarray(reference)
    if ref.dtype.kind in "USO":
        return OutputKind.LABELS
    if ref.dtype.kind != "f" or ref.ndim == 0:
        return OutputKind.REGRESSION
    lowered = name.lower()
    finite = ref[np.isfinite(ref)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    classes = ref.ndim == 2 and ref.shape[1] >= 2
    if classes:
        rows_are_probs = (
            lo >= 0.0
            and hi <= 1.0
            and bool(np.allclose(np.nan_to_num(ref).sum(axis=1), 1.0, atol=1e-3))
        )
        if any(h in lowered for h in _LOGIT_HINTS):
            return OutputKind.CLASSIFIER
        if rows_are_probs and (producer == "Softmax" or any(h in lowered for h in _CLASS_HINTS)):
            return OutputKind.PROBABILITIES
        if producer == "Softmax" and rows_are_probs:
            return OutputKind.PROBABILITIES
        if any(h in lowered for h in _CLASS_HINTS):
            return OutputKind.CLASSIFIER
    if ref.ndim >= 2 and any(h in lowered for h in _EMBEDDING_HINTS):
        return OutputKind.EMBEDDING
    if ref.ndim == 3 and ref.shape[-1] >= 8:  # [batch, sequence, hidden]: token states
        return OutputKind.EMBEDDING
    per_sample = ref.ndim == 1 or (ref.ndim == 2 and ref.shape[1] == 1)
    bounded = finite.size > 0 and lo >= -1.0 and hi <= 1.0
    if (
        per_sample
        and bounded
        and (producer in BOUNDING_OPS or any(h in lowered for h in _SCORE_HINTS))
    ):
        return OutputKind.SCORE
    return OutputKind.REGRESSION


def output_facts(
    reference: dict[str, np.ndarray], producers: dict[str, str] | None = None
) -> dict[str, OutputFacts]:
    """:func:`output_kind` and shape of every output of the source."""
    producers = producers or {}
    return {
        name: OutputFacts(
            kind=output_kind(name, ref, producers.get(name)), shape=tuple(np.shape(ref))
        )
        for name, ref in reference.items()
    }


def describe_policy(policy: TolerancePolicy, facts: dict[str, OutputFacts] | None = None) -> str:
    """One line for the console and the run log: the budget in use, per output with its kind."""
    if policy.budget is None:
        d = policy.default
        return (
            f"elementwise: |candidate - source| <= {d.atol or 0:g} + {d.rtol:g}*|source| and "
            f"cosine >= {d.min_cosine} on every sample (--atol/--rtol/--min-cosine)"
        )
    if not facts:
        return policy.budget
    parts = []
    budget = parse_budget(policy.budget)
    for name, f in facts.items():
        mine = [lim.text(with_output=False) for lim in budget.limits if lim.output == name]
        parts.append(f"{name} ({f.kind.value}): {','.join(mine) or 'exact'}")
    if policy.metric is not None:
        parts.append(f"task metric: {policy.metric.metric} may drop by {policy.metric.max_drop:g}")
    return "; ".join(parts)
