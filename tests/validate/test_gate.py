"""The accuracy gate: a GX suite over the per-sample error table, task metrics, per-pass errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import Candidate, ModelArtifact, SessionConfig, Tolerance
from bladeflow.core.policy import (
    MetricLimit,
    OutputTolerance,
    TolerancePolicy,
    policy_from_tolerance,
)
from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, compare, predict
from bladeflow.tasks.validate.gate import (
    accuracy_gate,
    candidate_steps,
    error_table,
    validate_chain,
)
from bladeflow.tasks.validate.metrics import task_metric
from tests.models import mlp
from tests.validate.conftest import MLP_SIGNATURE, artifact

DATA = {"x": np.random.default_rng(3).standard_normal((64, 8)).astype(np.float32)}


def _outputs(model: ModelArtifact, session: SessionConfig = REFERENCE_SESSION):
    return predict(model, session, DATA)


def test_exact_candidate_passes_the_gx_gate(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup: the same graph with every ORT optimization on
    reference = _outputs(mlp_artifact)
    outputs = _outputs(mlp_artifact, SessionConfig(graph_optimization_level="all"))
    # execute
    policy = TolerancePolicy.preset("fp32").model_copy(update={"classifier_outputs": ["y"]})
    outcome = accuracy_gate("ort-all", outputs, reference, policy, False, gx_dir=tmp_path)
    # assert
    assert outcome.report.passed, outcome.report.reason
    assert outcome.suite.success and len(outcome.table) == 64
    assert outcome.report.outputs["y"].max_abs_error < 1e-4
    assert outcome.table["y.top1_agree"].mean() == 1.0
    assert json.loads((tmp_path / "accuracy-ort-all.json").read_text())["success"] is True


def test_perturbed_weights_fail_the_gx_gate(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup: first-layer weights scaled by 1.01
    wrong = artifact(mlp(tmp_path / "wrong.onnx", scale=1.01), MLP_SIGNATURE)
    reference = _outputs(mlp_artifact)
    # execute
    outcome = accuracy_gate(
        "wrong", _outputs(wrong), reference, TolerancePolicy.preset("fp32"), False
    )
    # assert
    assert not outcome.report.passed
    failed = [c.name for c in outcome.suite.failed]
    assert any(n.startswith("y: |candidate - source| <= atol 0.0001") for n in failed), failed
    assert "samples outside tolerance" in outcome.report.reason
    assert "failed expectations" in outcome.report.reason
    assert outcome.report.outputs["y"].failing_samples > 0


def test_mostly_lets_a_few_bad_samples_through():
    # setup: 1 of 1000 samples points elsewhere
    rng = np.random.default_rng(0)
    ref = {"y": rng.standard_normal((1000, 4)).astype(np.float32)}
    got = {"y": ref["y"].copy()}
    got["y"][7] *= -1
    strict = TolerancePolicy(default=OutputTolerance(atol=None, min_cosine=0.999, mostly=1.0))
    lenient = TolerancePolicy(default=OutputTolerance(atol=None, min_cosine=0.999, mostly=0.998))
    # execute
    strict_out = accuracy_gate("c", got, ref, strict, False)
    lenient_out = accuracy_gate("c", got, ref, lenient, False)
    # assert
    assert not strict_out.report.passed and lenient_out.report.passed
    assert "cosine >= 0.999" in strict_out.suite.failed_names()


def test_per_output_override_and_nan_on_one_side():
    # setup: output "a" is off by 0.05, "b" has a NaN where the source has a number
    ref = {"a": np.ones((4, 3), np.float32), "b": np.ones((4, 3), np.float32)}
    got = {"a": ref["a"] + 0.05, "b": ref["b"].copy()}
    got["b"][2, 1] = np.nan
    policy = TolerancePolicy(outputs={"a": OutputTolerance(atol=0.1, rtol=0)})
    # execute
    outcome = accuracy_gate("c", got, ref, policy, False)
    # assert
    failed = outcome.suite.failed_names()
    assert "a:" not in failed and "b: |candidate - source|" in failed
    assert outcome.report.outputs["b"].failing_samples == 1
    assert np.isfinite(outcome.table.to_numpy()).all()


def test_shape_mismatch_fails_without_crashing():
    # setup
    ref = {"y": np.ones((2, 4), np.float32)}
    # execute
    outcome = accuracy_gate("c", {"y": np.ones((2, 3), np.float32)}, ref, TolerancePolicy(), False)
    # assert
    assert not outcome.report.passed and "shape" in outcome.report.reason


def test_policy_from_tolerance_agrees_with_the_old_compare():
    # setup
    rng = np.random.default_rng(1)
    ref = {"y": rng.standard_normal((50, 6)).astype(np.float32)}
    got = {"y": ref["y"] + rng.normal(0, 2e-4, ref["y"].shape).astype(np.float32)}
    tol = Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.999)
    # execute
    old = compare("c", got, ref, tol, False)
    new = accuracy_gate("c", got, ref, policy_from_tolerance(tol), False).report
    # assert
    assert old.passed == new.passed is False
    assert old.outputs["y"].failing_samples == new.outputs["y"].failing_samples > 0
    assert new.outputs["y"].max_abs_error == pytest.approx(old.outputs["y"].max_abs_error)


def test_presets_loosen_with_precision():
    # setup / execute
    fp32, fp16, int8 = (TolerancePolicy.preset(p) for p in ("fp32", "fp16", "int8"))
    # assert
    assert fp32.default.atol is not None and fp16.default.atol is not None
    assert fp32.default.atol < fp16.default.atol
    assert fp32.default.min_cosine > fp16.default.min_cosine > int8.default.min_cosine
    assert int8.default.atol is None and int8.metric is not None


def test_task_metric_drop_beyond_the_limit_fails(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup: labels are the source's own predictions, so the source scores 1.0; the candidate is
    # a different network. The elementwise checks are off to isolate the metric.
    reference = _outputs(mlp_artifact)
    labels = reference["y"].argmax(axis=1)
    other = artifact(mlp(tmp_path / "other.onnx", seed=1), MLP_SIGNATURE)
    loose = OutputTolerance(atol=None, min_cosine=-1.0)
    policy = TolerancePolicy(default=loose, metric=MetricLimit(metric="accuracy", max_drop=0.05))
    # execute
    bad = accuracy_gate("other", _outputs(other), reference, policy, False, labels=labels)
    good = accuracy_gate("same", reference, reference, policy, False, labels=labels)
    # assert
    assert bad.suite.success and not bad.report.passed
    assert bad.metric is not None and bad.metric.source == 1.0 and bad.metric.drop > 0.05
    assert "accuracy dropped" in bad.report.reason
    assert good.report.passed and good.metric is not None and good.metric.drop == 0.0


def test_relative_metric_limit():
    # setup
    limit = MetricLimit(metric="accuracy", max_drop=0.1, relative=True)
    # execute / assert
    assert limit.allowed_drop(0.5) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("metric", "scores", "labels", "expected"),
    [
        ("accuracy", [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [0, 1, 1], 2 / 3),
        ("f1", [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]], [0, 1, 1, 1], 0.7333333),
        ("auc", [[0.1], [0.4], [0.35], [0.8]], [0, 0, 1, 1], 0.75),
        ("spearman", [0.1, 0.5, 0.3, 0.9], [1.0, 3.0, 2.0, 4.0], 1.0),
    ],
)
def test_task_metrics(metric, scores, labels, expected: float):
    # execute
    value = task_metric(metric, np.asarray(scores), np.asarray(labels))
    # assert
    assert value == pytest.approx(expected, rel=1e-5)


def test_chain_reports_the_error_each_step_added(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup: step 1 reproduces the source exactly, step 2 perturbs the weights
    same = artifact(mlp(tmp_path / "s1.onnx"), MLP_SIGNATURE)
    worse = artifact(mlp(tmp_path / "s2.onnx", scale=1.05), MLP_SIGNATURE)
    steps = [("00-ort_graph", same, SessionConfig()), ("01-perturb", worse, SessionConfig())]
    # execute
    errors = validate_chain(mlp_artifact, steps, DATA, TolerancePolicy())
    # assert
    assert [e.step for e in errors] == ["00-ort_graph", "01-perturb"]
    assert errors[0].vs_source["y"].max_abs_error < 1e-5
    assert errors[1].vs_source["y"].max_abs_error > 1e-3
    assert errors[1].vs_previous["y"].max_abs_error == pytest.approx(
        errors[1].vs_source["y"].max_abs_error, rel=1e-3
    )


def test_error_table_columns():
    # setup
    ref = {"logits": np.eye(3, dtype=np.float32), "emb": np.ones((3, 2, 2), np.float32)}
    # execute
    table = error_table(ref, ref, TolerancePolicy())
    # assert
    assert {"logits.top1_agree", "logits.topk_overlap", "emb.cosine"} <= set(table.columns)
    assert "emb.top1_agree" not in table.columns  # not a classifier output
    # an embedding is not a classifier unless the policy says so
    emb2d = {"embedding": np.eye(3, dtype=np.float32)}
    assert "embedding.top1_agree" not in error_table(emb2d, emb2d, TolerancePolicy())
    forced = TolerancePolicy(classifier_outputs=["embedding"])
    assert "embedding.top1_agree" in error_table(emb2d, emb2d, forced)
    assert (table["logits.cosine"] == 1.0).all()


def test_int8_preset_gates_argmax_agreement_of_classifier_outputs():
    # setup: logits whose argmax flips on 5 of 100 samples while cosine stays high
    rng = np.random.default_rng(2)
    ref = {"logits": rng.uniform(0, 1, (100, 10)).astype(np.float32)}
    ref["logits"][:, 0] = ref["logits"].max(axis=1) + 0.01
    ref["logits"][:, 1] = ref["logits"][:, 0] - 0.001  # a near tie between classes 0 and 1
    got = {"logits": ref["logits"].copy()}
    got["logits"][:5, [0, 1]] = got["logits"][:5, [1, 0]]
    # execute
    outcome = accuracy_gate("int8", got, ref, TolerancePolicy.preset("int8"), False)
    # assert
    assert outcome.table["logits.top1_agree"].mean() == pytest.approx(0.95)
    assert not outcome.report.passed
    assert "argmax agrees with the source on >= 0.98" in outcome.suite.failed_names()
    assert [c.expectation for c in outcome.suite.failed] == ["expect_column_mean_to_be_between"]


def test_candidate_steps_reads_the_pass_folders(tmp_path: Path, mlp_artifact: ModelArtifact):
    # setup: a recipe folder as build_candidate writes it, two passes
    recipe = tmp_path / "cands" / "two-step"
    mlp(recipe / "00-ort_graph" / "model.onnx")
    last = artifact(mlp(recipe / "01-perturb" / "model.onnx", scale=1.05), MLP_SIGNATURE)
    cand = Candidate(name="two-step", artifact=last, session=SessionConfig())
    # execute
    steps = candidate_steps(cand, recipe)
    errors = validate_chain(mlp_artifact, steps, DATA, TolerancePolicy())
    # assert
    assert [s[0] for s in steps] == ["00-ort_graph", "01-perturb"]
    assert steps[0][2] == REFERENCE_SESSION and steps[1][1] == last
    assert errors[0].vs_source["y"].max_abs_error == 0.0
    assert errors[1].vs_previous["y"].max_abs_error > 1e-3
