"""The accuracy gate: run source and candidate on the same inputs and compare every sample."""

from __future__ import annotations

import numpy as np

from bladeflow.core.contract import (
    AccuracyReport,
    ModelArtifact,
    OutputAccuracy,
    SessionConfig,
    Tolerance,
)
from bladeflow.core.runtime import make_session, run
from bladeflow.tasks.validate.data import Dataset, batches, fixed_batch
from bladeflow.tasks.validate.labels import (
    agree_rows,
    as_text,
    first_difference,
    is_text,
    label_accuracy,
)

# The reference runs the graph exactly as written: no fusions, no reordered arithmetic.
REFERENCE_SESSION = SessionConfig(graph_optimization_level="disable")
_EVAL_BATCH = 32


def predict(model: ModelArtifact, session: SessionConfig, data: Dataset) -> dict[str, np.ndarray]:
    """Outputs of ``model`` over the whole dataset, concatenated along the sample axis.

    String outputs (ONNX ``tensor(string)``, object arrays from ONNX Runtime) come back as
    ``numpy.str_`` arrays, so they save with ``numpy.savez`` and compare by equality.
    """
    sess = make_session(model.path, session)
    names = [o.name for o in model.signature.outputs]
    size = fixed_batch(model.signature) or _EVAL_BATCH
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in batches(data, size):
        for name, value in run(sess, batch, names).items():
            chunks[name].append(as_text(value))
    return {n: _concat(v) for n, v in chunks.items()}


def compare(
    candidate: str,
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    tolerance: Tolerance,
    synthetic_data: bool,
) -> AccuracyReport:
    """Per-sample comparison of ``outputs`` against ``reference`` under ``tolerance``.

    String (label) outputs must be equal sample by sample; ``tolerance`` applies to numbers only.
    """
    per_output: dict[str, OutputAccuracy] = {}
    reasons: list[str] = []
    for name, ref in reference.items():
        got = outputs[name]
        if got.shape != ref.shape:
            reasons.append(f"output {name!r} has shape {got.shape}, source {ref.shape}")
            continue
        if is_text(ref) or is_text(got):
            acc = label_accuracy(agree_rows(got, ref))
            per_output[name] = acc
            if acc.failing_samples:
                reasons.append(
                    f"output {name!r}: {acc.failing_samples}/{acc.samples} samples have another "
                    f"label than the source (agreement {acc.mean_cosine:.4f}; first: "
                    f"{first_difference(got, ref)})"
                )
            continue
        acc = _output_accuracy(got, ref, tolerance)
        per_output[name] = acc
        if acc.failing_samples:
            reasons.append(
                f"output {name!r}: {acc.failing_samples}/{acc.samples} samples outside tolerance "
                f"(max abs error {acc.max_abs_error:.3g}, max rel error {acc.max_rel_error:.3g} vs "
                f"atol {tolerance.atol:g} + rtol {tolerance.rtol:g}*|source|; min cosine "
                f"{acc.min_cosine:.6f} vs {tolerance.min_cosine})"
            )
    return AccuracyReport(
        candidate=candidate,
        passed=not reasons,
        outputs=per_output,
        reason="; ".join(reasons),
        synthetic_data=synthetic_data,
    )


def _output_accuracy(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> OutputAccuracy:
    a = got.astype(np.float64)
    b = ref.astype(np.float64)
    n = b.shape[0] if b.ndim else 1
    a2, b2 = a.reshape(n, -1), b.reshape(n, -1)
    both_nan = np.isnan(a2) & np.isnan(b2)
    diff = np.where(both_nan, 0.0, np.abs(a2 - b2))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only is an infinite error
    bound = tol.atol + tol.rtol * np.abs(np.nan_to_num(b2))
    element_ok = (diff <= bound).all(axis=1)
    # Relative error only where |source| is above atol: near zero it measures nothing.
    significant = np.abs(b2) > max(tol.atol, 1e-12)
    rel = np.where(significant, diff / np.where(significant, np.abs(b2), 1.0), 0.0)
    cos = cosine_rows(np.nan_to_num(a2), np.nan_to_num(b2))
    ok = element_ok & (cos >= tol.min_cosine)
    return OutputAccuracy(
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        max_rel_error=float(rel.max()) if rel.size else 0.0,
        min_cosine=float(cos.min()) if cos.size else 1.0,
        mean_cosine=float(cos.mean()) if cos.size else 1.0,
        samples=n,
        failing_samples=int((~ok).sum()),
    )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (zero rows handled)."""
    if a.shape[1] == 1 and a.shape[0] > 1:
        # One number per sample (a score): a per-sample cosine is only its sign. Judge the
        # direction of the whole column instead, the same value for every sample.
        return np.full(a.shape[0], cosine_rows(a.T, b.T)[0])
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    # Two all-zero rows are identical; one all-zero row against a non-zero one is not.
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    cos = np.where((na == 0) ^ (nb == 0), 0.0, cos)
    return np.clip(np.nan_to_num(cos, nan=0.0), -1.0, 1.0)


def _concat(values: list[np.ndarray]) -> np.ndarray:
    if len(values) == 1:
        return values[0]
    if all(v.ndim > 0 for v in values):
        return np.concatenate(values, axis=0)
    return np.stack(values)
