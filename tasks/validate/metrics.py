"""Task metrics with labels (accuracy, macro F1, AUC, Spearman) for source and candidate."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from bladeflow.core.errors import DataError
from bladeflow.core.policy import MetricLimit, MetricName
from bladeflow.tasks.validate.labels import as_text, is_text


class MetricComparison(BaseModel):
    """A task metric of source and candidate, and whether the drop is within the limit."""

    metric: MetricName
    output: str | None
    source: float
    candidate: float
    drop: float
    allowed_drop: float
    passed: bool

    def describe(self) -> str:
        verdict = "within" if self.passed else "exceeds"
        return (
            f"{self.metric} dropped {self.drop:.4g} (source {self.source:.4f}, candidate "
            f"{self.candidate:.4f}), {verdict} the allowed drop {self.allowed_drop:.4g}"
        )


def task_metric(metric: MetricName, scores: np.ndarray, labels: np.ndarray) -> float:
    """``metric`` of model output ``scores`` against ``labels``.

    accuracy / f1 (macro): argmax of a [n, classes] output, or ``score > 0.5`` for one column.
    auc: binary (probability or logit of the positive class: last column) or one-vs-rest.
    spearman: rank correlation of a similarity score ([n] or [n, 1]) with the labels.
    A string output (predicted class labels) is compared with the labels as is (accuracy, f1).

    Raises:
        DataError: labels and outputs do not fit the metric (count, class ids, score shape).
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    if is_text(scores):
        return _label_metric(metric, scores, labels)
    if is_text(labels):
        raise DataError(
            f"{metric} needs class ids or scores as labels for a numeric output; the labels are "
            "text: score the model's string label output instead (metric.output)"
        )
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if s.shape[0] != y.shape[0]:
        raise DataError(f"{y.shape[0]} labels for {s.shape[0]} samples: give one label per sample")
    s2 = s.reshape(s.shape[0], -1)
    if metric == "spearman":
        if s2.shape[1] != 1:
            raise DataError(
                f"spearman needs one similarity score per sample; the output has {s2.shape[1]}"
            )
        rho = spearmanr(s2[:, 0], y.astype(np.float64)).statistic
        return float(np.nan_to_num(rho))
    if metric == "auc":
        try:
            if s2.shape[1] <= 2:
                return float(roc_auc_score(y, s2[:, -1]))
            probs = _softmax(s2)
            return float(roc_auc_score(y, probs, multi_class="ovr"))
        except ValueError as exc:
            raise DataError(f"cannot compute AUC from these labels: {exc}") from exc
    predicted = (s2[:, 0] > 0.5).astype(np.int64) if s2.shape[1] == 1 else s2.argmax(axis=1)
    if metric == "accuracy":
        return float(accuracy_score(y, predicted))
    return float(f1_score(y, predicted, average="macro"))


def _label_metric(metric: MetricName, predicted: np.ndarray, labels: np.ndarray) -> float:
    """accuracy / macro f1 of predicted string labels against the given labels (as text)."""
    from sklearn.metrics import accuracy_score, f1_score

    p = as_text(predicted).astype(np.str_).reshape(-1)
    y = as_text(np.asarray(labels)).astype(np.str_).reshape(-1)
    if p.shape[0] != y.shape[0]:
        raise DataError(f"{y.shape[0]} labels for {p.shape[0]} samples: give one label per sample")
    if metric == "accuracy":
        return float(accuracy_score(y, p))
    if metric == "f1":
        return float(f1_score(y, p, average="macro"))
    raise DataError(
        f"{metric} needs numeric scores, but the scored output holds string labels: score the "
        "probabilities output instead (metric.output), or use accuracy or f1"
    )


def compare_metric(
    limit: MetricLimit, source: np.ndarray, candidate: np.ndarray, labels: np.ndarray
) -> MetricComparison:
    """Source vs candidate metric; fails when the candidate is worse by more than allowed."""
    src = task_metric(limit.metric, source, labels)
    cand = task_metric(limit.metric, candidate, labels)
    drop = src - cand
    allowed = limit.allowed_drop(src)
    return MetricComparison(
        metric=limit.metric,
        output=limit.output,
        source=src,
        candidate=cand,
        drop=drop,
        allowed_drop=allowed,
        passed=drop <= allowed + 1e-12,
    )


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(z / z.sum(axis=1, keepdims=True))
