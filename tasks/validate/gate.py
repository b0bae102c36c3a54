"""The accuracy gate as a Great Expectations suite over a per-sample table of candidate vs source.

:func:`error_table` measures every sample of every output (max abs/rel error, cosine, how far
past the elementwise bound, argmax/top-k agreement for 2-D outputs); :func:`gate_checks` turns a
:class:`TolerancePolicy` into expectations on that table; :func:`accuracy_gate` runs them (the
suite's result IS the verdict) and, with labels, also judges the task-metric drop.
:func:`validate_chain` measures the error each pass of a recipe introduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

from bladeflow.core.contract import (
    AccuracyReport,
    Candidate,
    ModelArtifact,
    OutputAccuracy,
    SessionConfig,
)
from bladeflow.core.hashing import sha256_path
from bladeflow.core.policy import OutputTolerance, TolerancePolicy
from bladeflow.core.text import safe_name
from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, cosine_rows, predict
from bladeflow.tasks.validate.data import Dataset, mask_padding
from bladeflow.tasks.validate.gx import Check, SuiteResult, run_checks
from bladeflow.tasks.validate.labels import (
    LABEL_AGREE,
    agree_rows,
    first_difference,
    is_text,
    label_accuracy,
)
from bladeflow.tasks.validate.metrics import MetricComparison, compare_metric

if TYPE_CHECKING:
    import pandas as pd

_HUGE = 1e300  # stands for an infinite error in the table (GX and JSON dislike inf)
PROB_DRIFT = "prob_drift"  # per sample: largest |p_candidate - p_source| over the classes
DECISION_AGREE = "decision_agree"  # per sample: 1.0 when value >= threshold agrees everywhere


@dataclass
class GateOutcome:
    """Everything the gate measured for one candidate.

    ``report`` is the contract object the flow already passes around; ``table`` the per-sample
    errors (one row per sample); ``suite`` the GX verdict; ``metric`` the task-metric comparison
    when labels were given.
    """

    report: AccuracyReport
    table: pd.DataFrame
    suite: SuiteResult
    metric: MetricComparison | None = None


def error_table(
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    policy: TolerancePolicy,
) -> pd.DataFrame:
    """One row per sample; columns ``<output>.<measure>`` for every output of the source.

    Measures: ``max_abs_error``, ``max_rel_error`` (where |source| > 1e-6), ``cosine``,
    ``bound_ratio`` (max over elements of error / (atol + rtol*|source|): <= 1 means within),
    and for classifier outputs (``policy.is_classifier``, 2-D, >= 2 columns) ``top1_agree`` (0/1)
    and ``topk_overlap`` (0..1). When the output's tolerance limits them: ``prob_drift`` (2-D:
    largest change of a class probability after softmax) and ``decision_agree`` (0/1: whether
    ``value >= decision_threshold`` agrees with the source on every element of the sample).
    A NaN on one side only counts as an infinite error.
    String outputs (class labels) have no numeric distance: their only column is
    ``label_agree`` (1.0 when every element of the sample equals the source's, else 0.0).

    Raises:
        ValueError: an output's shape differs from the source's (the caller reports it).
    """
    import pandas as pd

    columns: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        got = outputs[name]
        if got.shape != ref.shape:
            raise ValueError(f"output {name!r} has shape {got.shape}, source {ref.shape}")
        if is_text(ref) or is_text(got):
            columns[f"{name}.{LABEL_AGREE}"] = agree_rows(got, ref)
            continue
        tol = policy.for_output(name)
        a, b = _rows(got), _rows(ref)
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)
        absb = np.abs(np.nan_to_num(b))
        significant = absb > 1e-6
        rel = np.where(significant, diff / np.where(significant, absb, 1.0), 0.0)
        bound = (tol.atol or 0.0) + tol.rtol * absb
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bound > 0, diff / np.where(bound > 0, bound, 1.0), 0.0)
        ratio = np.where((bound == 0) & (diff > 0), np.inf, ratio)
        columns[f"{name}.max_abs_error"] = _finite(diff.max(axis=1, initial=0.0))
        columns[f"{name}.max_rel_error"] = _finite(rel.max(axis=1, initial=0.0))
        columns[f"{name}.bound_ratio"] = _finite(ratio.max(axis=1, initial=0.0))
        columns[f"{name}.cosine"] = cosine_rows(np.nan_to_num(a), np.nan_to_num(b))
        classes = ref.ndim == 2 and ref.shape[1] >= 2
        if classes and tol.max_prob_drift is not None:
            drift = np.abs(_probabilities(a) - _probabilities(b)).max(axis=1, initial=0.0)
            columns[f"{name}.{PROB_DRIFT}"] = _finite(drift)
        if tol.min_decision_agreement is not None:
            t = tol.decision_threshold
            agree = ((np.nan_to_num(a, nan=-np.inf) >= t) == (b >= t)).all(axis=1)
            columns[f"{name}.{DECISION_AGREE}"] = agree.astype(np.float64)
        if classes and policy.is_classifier(name):
            k = min(tol.top_k, ref.shape[1])
            top_a = np.argsort(-np.nan_to_num(a, nan=-np.inf), axis=1)[:, :k]
            top_b = np.argsort(-np.nan_to_num(b, nan=-np.inf), axis=1)[:, :k]
            columns[f"{name}.top1_agree"] = (top_a[:, 0] == top_b[:, 0]).astype(np.float64)
            overlap = [len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True)]
            columns[f"{name}.topk_overlap"] = np.asarray(overlap, dtype=np.float64)
    return pd.DataFrame(columns)


@dataclass(frozen=True)
class Limit:
    """One limit of the gate on a column of the error table.

    ``each``: the column is within [min_value, max_value] on at least ``mostly`` of the samples;
    ``mean``: the column's mean (an agreement share) is at least ``min_value``. The GX suite
    (:func:`gate_checks`) and the numpy judge (:func:`judge`, used by accuracy recovery) both
    read these, so the search and the gate apply the same budget.
    """

    output: str
    column: str
    kind: str  # "each" | "mean"
    text: str
    min_value: float | None = None
    max_value: float | None = None
    mostly: float = 1.0

    def holds(self, table: pd.DataFrame) -> bool:
        if self.column not in table:
            return False
        values = table[self.column].to_numpy(dtype=np.float64)
        if not len(values):
            return True
        if self.kind == "mean":
            return bool(values.mean() >= (self.min_value or 0.0))
        return bool(self.within(values).mean() >= self.mostly)

    def within(self, values: np.ndarray) -> np.ndarray:
        """Per sample: inside the limit (``mean`` limits: the sample agrees)."""
        if self.kind == "mean":
            return values >= 1.0
        ok = np.ones(len(values), dtype=bool)
        if self.min_value is not None:
            ok &= values >= self.min_value
        if self.max_value is not None:
            ok &= values <= self.max_value
        return ok

    def measured(self, table: pd.DataFrame) -> str:
        """What the candidate reached on this limit, for the reason of a failure."""
        values = table[self.column].to_numpy(dtype=np.float64)
        if self.kind == "mean":
            return f"{self.text}: {values.mean():.4g}"
        worst = values.min() if self.min_value is not None else values.max()
        outside = int((~self.within(values)).sum())
        return f"{self.text}: worst {worst:.6g}, {outside}/{len(values)} samples outside"

    def check(self) -> Check:
        if self.kind == "mean":
            return Check(
                self.text,
                "ExpectColumnMeanToBeBetween",
                {"column": self.column, "min_value": self.min_value},
            )
        kwargs: dict[str, object] = {"column": self.column, "mostly": self.mostly}
        if self.min_value is not None:
            kwargs["min_value"] = self.min_value
        if self.max_value is not None:
            kwargs["max_value"] = self.max_value
        return Check(self.text, "ExpectColumnValuesToBeBetween", kwargs)


def output_limits(name: str, tol: OutputTolerance, table: pd.DataFrame) -> list[Limit]:
    """The limits ``tol`` sets on numeric output ``name`` (its columns in ``table``)."""
    share = "for every sample" if tol.mostly >= 1 else f"for >= {tol.mostly:.3%} of samples"
    limits: list[Limit] = []
    if tol.atol is not None:
        bound = (
            f"{tol.atol:g}" if tol.rtol == 0 else f"atol {tol.atol:g} + rtol {tol.rtol:g}*|source|"
        )
        limits.append(
            Limit(
                name,
                f"{name}.bound_ratio",
                "each",
                f"{name}: |candidate - source| <= {bound} {share}",
                max_value=1.0,
                mostly=tol.mostly,
            )
        )
    if tol.min_cosine is not None:
        limits.append(
            Limit(
                name,
                f"{name}.cosine",
                "each",
                f"{name}: cosine >= {tol.min_cosine:g} {share}",
                min_value=tol.min_cosine,
                mostly=tol.mostly,
            )
        )
    if tol.max_prob_drift is not None and f"{name}.{PROB_DRIFT}" in table:
        limits.append(
            Limit(
                name,
                f"{name}.{PROB_DRIFT}",
                "each",
                f"{name}: class probabilities move by <= {tol.max_prob_drift:g} {share}",
                max_value=tol.max_prob_drift,
                mostly=tol.mostly,
            )
        )
    if tol.min_top1_agreement is not None and f"{name}.top1_agree" in table:
        limits.append(
            Limit(
                name,
                f"{name}.top1_agree",
                "mean",
                f"{name}: argmax agrees with the source on >= {tol.min_top1_agreement:.4g} of "
                "samples",
                min_value=tol.min_top1_agreement,
            )
        )
    if tol.min_decision_agreement is not None:
        limits.append(
            Limit(
                name,
                f"{name}.{DECISION_AGREE}",
                "mean",
                f"{name}: decision (>= {tol.decision_threshold:g}) agrees with the source on >= "
                f"{tol.min_decision_agreement:.4g} of samples",
                min_value=tol.min_decision_agreement,
            )
        )
    return limits


def gate_limits(table: pd.DataFrame, outputs: list[str], policy: TolerancePolicy) -> list[Limit]:
    """Every limit of the gate on numeric outputs (label outputs are judged by agreement)."""
    return [
        lim
        for name in outputs
        if f"{name}.{LABEL_AGREE}" not in table
        for lim in output_limits(name, policy.for_output(name), table)
    ]


def gate_checks(table: pd.DataFrame, outputs: list[str], policy: TolerancePolicy) -> list[Check]:
    """The expectations that make up the gate, one group per output."""
    checks = [
        Check(
            f"table has the per-sample columns of outputs {outputs}",
            "ExpectTableColumnsToMatchSet",
            {"column_set": list(table.columns), "exact_match": True},
        ),
        Check("at least one sample compared", "ExpectTableRowCountToBeBetween", {"min_value": 1}),
    ]
    for name in outputs:
        tol = policy.for_output(name)
        if f"{name}.{LABEL_AGREE}" in table:
            checks += _label_checks(name, tol)
            continue
        checks.append(
            Check(
                f"{name}: no NaN in the error table",
                "ExpectColumnValuesToNotBeNull",
                {"column": f"{name}.cosine"},
            )
        )
        checks += [lim.check() for lim in output_limits(name, tol, table)]
    return checks


def _label_checks(name: str, tol: OutputTolerance) -> list[Check]:
    """A string (label) output: agreement with the source's labels, gated like argmax."""
    column = f"{name}.{LABEL_AGREE}"
    share = (
        "every sample"
        if tol.min_label_agreement >= 1
        else f">= {tol.min_label_agreement:.4g} of samples"
    )
    return [
        Check(
            f"{name}: a label agreement value for every sample",
            "ExpectColumnValuesToNotBeNull",
            {"column": column},
        ),
        Check(
            f"{name}: label equals the source's on {share}",
            "ExpectColumnMeanToBeBetween",
            {"column": column, "min_value": tol.min_label_agreement},
        ),
    ]


def accuracy_gate(
    candidate: str,
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    policy: TolerancePolicy,
    synthetic_data: bool,
    labels: np.ndarray | None = None,
    gx_dir: Path | None = None,
) -> GateOutcome:
    """Judge ``candidate`` against the source with a GX suite built from ``policy``.

    The suite's success is the verdict; with ``labels`` and ``policy.metric`` the task metric of
    source and candidate is computed and a drop beyond ``max_drop`` fails the gate too. With
    ``gx_dir`` the GX result is written to ``gx_dir/accuracy-<candidate>.json``.
    """
    import pandas as pd

    shape_problems = [
        f"output {n!r} has shape {outputs[n].shape if n in outputs else '(missing)'}, "
        f"source {r.shape}"
        for n, r in reference.items()
        if n not in outputs or outputs[n].shape != r.shape
    ]
    compared = [n for n in reference if n in outputs and outputs[n].shape == reference[n].shape]
    table = error_table(
        {n: outputs[n] for n in compared}, {n: reference[n] for n in compared}, policy
    )
    if table.empty and not compared:
        table = pd.DataFrame()
    suite = run_checks(table, gate_checks(table, compared, policy), f"accuracy-{candidate}")
    if gx_dir is not None:
        suite.save(Path(gx_dir) / f"accuracy-{safe_name(candidate)}.json")

    metric: MetricComparison | None = None
    if labels is not None and policy.metric is not None:
        out = policy.metric.output or next(iter(reference))
        metric = compare_metric(policy.metric, reference[out], outputs[out], labels)

    per_output = {n: _summary(table, n, policy.for_output(n)) for n in compared}
    reasons = list(shape_problems) + source_nonfinite(reference)
    for name, acc in per_output.items():
        if f"{name}.{LABEL_AGREE}" in table:
            tol = policy.for_output(name)
            if acc.mean_cosine < tol.min_label_agreement:
                reasons.append(
                    f"output {name!r}: label agreement {acc.mean_cosine:.4f} < "
                    f"{tol.min_label_agreement:g} ({acc.failing_samples}/{acc.samples} samples "
                    f"differ; first: {first_difference(outputs[name], reference[name])})"
                )
            continue
        if why := output_reason(table, name, acc, policy.for_output(name)):
            reasons.append(why)
    if not suite.success:
        reasons.append("failed expectations: " + suite.failed_names())
    if metric is not None and not metric.passed:
        reasons.append(metric.describe())
    passed = (
        suite.success
        and not shape_problems
        and not source_nonfinite(reference)
        and (metric is None or metric.passed)
    )
    report = AccuracyReport(
        candidate=candidate,
        passed=passed,
        outputs=per_output,
        reason="" if passed else "; ".join(reasons),
        synthetic_data=synthetic_data,
    )
    return GateOutcome(report=report, table=table, suite=suite, metric=metric)


def output_reason(table: pd.DataFrame, name: str, acc: OutputAccuracy, tol: OutputTolerance) -> str:
    """Why numeric output ``name`` fails ``tol`` ("" when it passes): what each broken limit
    measured, after the errors every report shows."""
    failed = [lim for lim in output_limits(name, tol, table) if not lim.holds(table)]
    if not failed:
        return ""
    # The broken limits first: consoles cut long reasons short.
    return (
        f"output {name!r}: {acc.failing_samples}/{acc.samples} samples outside tolerance ("
        + "; ".join(lim.measured(table).removeprefix(f"{name}: ") for lim in failed)
        + (f"; mostly {tol.mostly:g}" if tol.mostly < 1 else "")
        + f"; max abs error {acc.max_abs_error:.3g}, max rel error {acc.max_rel_error:.3g}, "
        f"min cosine {acc.min_cosine:.6f})"
    )


def judge(
    candidate: str,
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    policy: TolerancePolicy,
) -> AccuracyReport:
    """The gate's verdict without the GX suite (same limits, numpy only), for searches that
    judge many attempts (accuracy recovery). The task metric is not judged (no labels)."""
    problems = [
        f"output {n!r} has shape {outputs[n].shape if n in outputs else '(missing)'}, "
        f"source {r.shape}"
        for n, r in reference.items()
        if n not in outputs or outputs[n].shape != r.shape
    ]
    compared = [n for n in reference if n in outputs and outputs[n].shape == reference[n].shape]
    table = error_table(
        {n: outputs[n] for n in compared}, {n: reference[n] for n in compared}, policy
    )
    per_output = {n: _summary(table, n, policy.for_output(n)) for n in compared}
    reasons = problems + source_nonfinite(reference)
    for name, acc in per_output.items():
        tol = policy.for_output(name)
        if f"{name}.{LABEL_AGREE}" in table:
            if acc.mean_cosine < tol.min_label_agreement:
                reasons.append(
                    f"output {name!r}: label agreement {acc.mean_cosine:.4f} < "
                    f"{tol.min_label_agreement:g}"
                )
        elif why := output_reason(table, name, acc, tol):
            reasons.append(why)
    return AccuracyReport(
        candidate=candidate,
        passed=not reasons,
        outputs=per_output,
        reason="; ".join(reasons),
        synthetic_data=False,
    )


def source_nonfinite(reference: dict[str, np.ndarray]) -> list[str]:
    """Why the source's own outputs cannot be judged: NaN/inf on validation samples.

    A candidate that reproduces a NaN would "match" it, and a model that outputs NaN is not one
    to register: every candidate fails the gate (exit 3) with this reason.
    """
    problems = []
    for name, ref in reference.items():
        if not np.issubdtype(ref.dtype, np.floating) or ref.ndim == 0:
            continue
        bad = ~np.isfinite(ref.reshape(ref.shape[0], -1)).all(axis=1)
        if bad.any():
            problems.append(
                f"the source model itself outputs NaN/inf in {name!r} for {int(bad.sum())}/"
                f"{bad.size} validation samples (first: sample {int(np.argmax(bad))}); such "
                "outputs cannot be compared: fix the model or leave those inputs out of the data"
            )
    return problems


class StepError(BaseModel):
    """The error one pass introduced: its outputs vs the source and vs the step before it."""

    step: str
    sha256: str
    vs_source: dict[str, OutputAccuracy] = Field(description="output -> error against the source")
    vs_previous: dict[str, OutputAccuracy] = Field(
        description="output -> error against the previous step: what this pass added"
    )


def validate_chain(
    source: ModelArtifact,
    steps: list[tuple[str, ModelArtifact, SessionConfig]],
    data: Dataset,
    policy: TolerancePolicy,
    reference: dict[str, np.ndarray] | None = None,
) -> list[StepError]:
    """Run every intermediate artifact of a recipe and measure the error each step introduced.

    ``steps`` are (step name, artifact, session) in the order the passes ran; the source runs
    with :data:`REFERENCE_SESSION` unless ``reference`` outputs are given.
    """
    ref = reference if reference is not None else predict(source, REFERENCE_SESSION, data)
    ref = mask_padding(ref, data)  # as the gate compares: real tokens only
    previous = ref
    result: list[StepError] = []
    for name, artifact, session in steps:
        got = mask_padding(predict(artifact, session, data), data)
        result.append(
            StepError(
                step=name,
                sha256=artifact.sha256,
                vs_source=_summaries(got, ref, policy),
                vs_previous=_summaries(got, previous, policy),
            )
        )
        previous = got
    return result


def candidate_steps(
    candidate: Candidate, recipe_dir: Path
) -> list[tuple[str, ModelArtifact, SessionConfig]]:
    """The intermediate artifacts of a built recipe, for :func:`validate_chain`.

    ``recipe_dir`` holds one folder per pass, ``NN-<pass>/model.onnx`` (as ``build_candidate``
    writes them). Intermediate models run with :data:`REFERENCE_SESSION`, so each step's error is
    its own; the last one is the candidate itself, run with the candidate's session.
    """
    folders = sorted(p for p in Path(recipe_dir).iterdir() if (p / "model.onnx").is_file())
    steps: list[tuple[str, ModelArtifact, SessionConfig]] = []
    for i, folder in enumerate(folders):
        model = folder / "model.onnx"
        if i == len(folders) - 1:
            steps.append((folder.name, candidate.artifact, candidate.session))
            continue
        artifact = candidate.artifact.model_copy(
            update={
                "path": str(model),
                "sha256": sha256_path(model),
                "size_bytes": model.stat().st_size,
            }
        )
        steps.append((folder.name, artifact, REFERENCE_SESSION))
    return steps


def _summaries(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray], policy: TolerancePolicy
) -> dict[str, OutputAccuracy]:
    same = [n for n in ref if n in got and got[n].shape == ref[n].shape]
    table = error_table({n: got[n] for n in same}, {n: ref[n] for n in same}, policy)
    return {n: _summary(table, n, policy.for_output(n)) for n in same}


def _summary(table: pd.DataFrame, name: str, tol: OutputTolerance) -> OutputAccuracy:
    if f"{name}.{LABEL_AGREE}" in table:
        return label_accuracy(table[f"{name}.{LABEL_AGREE}"].to_numpy())
    cos = table[f"{name}.cosine"].to_numpy()
    ok = np.ones(len(cos), dtype=bool)
    for lim in output_limits(name, tol, table):
        ok &= lim.within(table[lim.column].to_numpy(dtype=np.float64))
    n = len(table)
    return OutputAccuracy(
        max_abs_error=float(table[f"{name}.max_abs_error"].max()) if n else 0.0,
        max_rel_error=float(table[f"{name}.max_rel_error"].max()) if n else 0.0,
        min_cosine=float(cos.min()) if n else 1.0,
        mean_cosine=float(cos.mean()) if n else 1.0,
        samples=n,
        failing_samples=int((~ok).sum()),
    )


def _probabilities(x: np.ndarray) -> np.ndarray:
    """Rows as class probabilities: kept when they already are (in [0, 1], summing to 1), else
    softmax. Rows are compared in their own form, so both sides take the same path."""
    x = np.nan_to_num(x, nan=0.0, posinf=1e300, neginf=-1e300)
    if x.size and x.min() >= 0 and x.max() <= 1 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        return x
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    n = x.shape[0] if x.ndim else 1
    return x.reshape(n, -1)


def _finite(x: np.ndarray) -> np.ndarray:
    return np.nan_to_num(x.astype(np.float64), nan=_HUGE, posinf=_HUGE, neginf=_HUGE)
