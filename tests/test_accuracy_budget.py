"""The accuracy budget (--accuracy): its grammar, the default per output kind, the gate's new
measures, accuracy recovery searching the same budget, and the flow recording it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from bladeflow.core.budget import (
    ACCEPTED_FORMS,
    DEFAULT_BUDGETS,
    AccuracyBudget,
    BudgetError,
    OutputFacts,
    OutputKind,
    output_facts,
    output_kind,
    parse_budget,
)
from bladeflow.core.params import OptimizeParams
from bladeflow.core.policy import TolerancePolicy
from bladeflow.core.settings import Settings
from bladeflow.tasks.validate.budget import producers, resolve_budget
from bladeflow.tasks.validate.gate import accuracy_gate, judge

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("cosine>=0.99", "cosine>=0.99"),
        (" argmax >= 0.995 , prob_drift<=0.02 ", "argmax>=0.995,prob_drift<=0.02"),
        ("abs<=0.02", "abs<=0.02"),
        ("decision>=0.99@0.5", "decision>=0.99@0.5"),
        ("metric_drop<=0.005", "metric_drop<=0.005"),
        ("f1_drop<=0.01", "f1_drop<=0.01"),
        ("similarity:abs<=0.02,similarity:decision>=0.99@0.5", None),
        ("dense/Softmax:0:argmax>=0.99", None),  # output names may hold ':'
        ("label>=0.98,exact", None),
        ("auto", "auto"),
    ],
)
def test_budget_grammar_reads_every_accepted_form(text: str, canonical: str | None):
    # execute
    budget = parse_budget(text)
    # assert: the canonical text reads back to the same budget
    assert budget.text() == (canonical or text)
    assert parse_budget(budget.text()) == budget


def test_per_output_limits_keep_the_output_name():
    budget = parse_budget("dense/Softmax:0:argmax>=0.99,decision>=0.9@-0.25")
    first, second = budget.limits
    assert (first.output, first.measure, first.value) == ("dense/Softmax:0", "argmax", 0.99)
    assert (second.output, second.threshold, second.value) == (None, -0.25, 0.9)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("cosin>=0.99", "unknown measure 'cosin'"),
        ("cosine<=0.99", "cosine takes >="),
        ("abs>=0.02", "abs takes <="),
        ("argmax>=1.5", "argmax must be in [0, 1]"),
        ("abs<=-0.1", "abs must be >= 0"),
        ("cosine>=high", "'high' is not a number"),
        ("cosine>=nan", "is not a number"),
        ("decision>=0.99", "decision needs its threshold"),
        ("abs<=0.02@0.5", "only decision takes @THRESHOLD"),
        (":abs<=0.02", "nothing before ':'"),
        ("cosine>=0.99,,abs<=1", "empty limit"),
        ("cosine>=0.99,cosine>=0.9", "limits cosine twice"),
        ("metric_drop<=0.01,f1_drop<=0.01", "limits metric_drop twice"),
        ("exact>=1", "'exact' takes no value"),
        ("", "is empty"),
        ("0.99", "not MEASURE>=VALUE"),
    ],
)
def test_bad_budgets_are_refused_listing_the_accepted_forms(text: str, why: str):
    # execute
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    # assert: the reason, then every accepted form
    message = str(info.value)
    assert why in message
    assert message.endswith(ACCEPTED_FORMS)
    for form in ("cosine>=C", "argmax>=R", "prob_drift<=D", "abs<=E", "decision>=R@T"):
        assert form in message
    assert isinstance(info.value, ValueError)


def test_optimize_params_refuses_a_bad_budget_and_picks_the_default():
    # a bad expression from the Prefect UI form is refused like the CLI's
    with pytest.raises(ValidationError, match="accepted forms"):
        OptimizeParams(source="m.onnx", name="m", accuracy="cosine>0.99")
    # nothing given: the default for each output's kind
    assert OptimizeParams(source="m.onnx", name="m").accuracy_budget() == AccuracyBudget()
    # an explicit tolerance: exactly today's elementwise gate
    given = OptimizeParams(source="m.onnx", name="m", tolerance={"atol": 1e-3})
    assert given.accuracy_budget() is None
    assert given.effective_policy().default.atol == 1e-3
    assert given.effective_policy().budget is None
    # a budget is stored in its canonical form
    p = OptimizeParams(source="m.onnx", name="m", accuracy=" cosine >= 0.99 ")
    assert p.accuracy == "cosine>=0.99"


def _cli(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BLADEFLOW_HOME": str(home)}
    env.pop("PREFECT_HOME", None)
    return subprocess.run(
        [sys.executable, "-m", "bladeflow.app.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=home.parent,
    )


def test_cli_exits_2_on_a_bad_budget_listing_the_forms(tmp_path: Path):
    from tests import models

    src = models.mlp(tmp_path / "m.onnx")
    # execute
    bad = _cli(["optimize", str(src), "-n", "m", "--accuracy", "cosine>=2"], tmp_path / "h")
    both = _cli(
        ["optimize", str(src), "-n", "m", "--accuracy", "cosine>=0.99", "--atol", "0.1"],
        tmp_path / "h",
    )
    # assert
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "cosine must be in [-1, 1], got 2" in bad.stderr
    assert "accepted forms" in bad.stderr and "decision>=R@T" in bad.stderr
    assert both.returncode == 2 and "exclude each other" in both.stderr


@pytest.mark.parametrize(
    ("name", "values", "producer", "kind"),
    [
        ("logits", RNG.standard_normal((20, 5)), None, OutputKind.CLASSIFIER),
        ("output", RNG.dirichlet(np.ones(4), 20), "Softmax", OutputKind.PROBABILITIES),
        ("probabilities", RNG.dirichlet(np.ones(4), 20), None, OutputKind.PROBABILITIES),
        ("last_hidden_state", RNG.standard_normal((4, 7, 32)), None, OutputKind.EMBEDDING),
        ("sentence_embedding", RNG.standard_normal((20, 384)), None, OutputKind.EMBEDDING),
        ("output_0", RNG.standard_normal((4, 7, 16)), None, OutputKind.EMBEDDING),
        ("similarity", RNG.uniform(-1, 1, 20), None, OutputKind.SCORE),
        ("out", RNG.uniform(0, 1, (20, 1)), "Sigmoid", OutputKind.SCORE),
        ("label", np.array(["cat", "dog"] * 10), None, OutputKind.LABELS),
        # no name, no bounding op: a plain value, judged exactly
        ("y", RNG.standard_normal((20, 4)), None, OutputKind.REGRESSION),
        ("y", RNG.uniform(0, 1, 20), None, OutputKind.REGRESSION),
        ("similarity", RNG.uniform(-1, 3, 20), None, OutputKind.REGRESSION),  # not bounded
        ("ids", np.arange(20), None, OutputKind.REGRESSION),
    ],
)
def test_output_kind_from_name_values_and_producer(name, values, producer, kind):
    assert output_kind(name, np.asarray(values), producer) is kind


def test_auto_budget_is_the_default_of_each_outputs_kind():
    # setup
    reference = {
        "logits": RNG.standard_normal((20, 3)),
        "pooled_embedding": RNG.standard_normal((20, 16)),
        "similarity": RNG.uniform(-1, 1, 20),
        "y": RNG.standard_normal((20, 2)),
    }
    facts = output_facts(reference)
    # execute
    policy = AccuracyBudget().to_policy(facts)
    # assert
    assert policy.budget == (
        "logits:argmax>=0.99,logits:prob_drift<=0.02,pooled_embedding:cosine>=0.99,"
        "similarity:abs<=0.02,y:exact"
    )
    logits, emb, score, y = (policy.for_output(n) for n in reference)
    assert (logits.min_top1_agreement, logits.max_prob_drift, logits.atol) == (0.99, 0.02, None)
    assert logits.min_cosine is None and policy.is_classifier("logits")
    assert (emb.min_cosine, emb.atol) == (0.99, None) and not policy.is_classifier(
        "pooled_embedding"
    )
    assert (score.atol, score.rtol, score.min_cosine) == (0.02, 0.0, None)
    assert (y.atol, y.rtol, y.min_cosine) == (1e-4, 1e-3, 0.999)  # today's exact gate
    assert set(DEFAULT_BUDGETS) == set(OutputKind)


def test_given_budget_applies_where_it_can_and_per_output_limits_win():
    facts = {
        "emb": OutputFacts(kind=OutputKind.EMBEDDING, shape=(20, 7, 16)),
        "label": OutputFacts(kind=OutputKind.LABELS, shape=(20,)),
        "logits": OutputFacts(kind=OutputKind.CLASSIFIER, shape=(20, 3)),
    }
    # execute
    policy = parse_budget("cosine>=0.98,logits:argmax>=0.995,metric_drop<=0.005").to_policy(facts)
    # assert: labels cannot be judged by cosine: their kind's default applies
    assert policy.for_output("label").min_label_agreement == 0.99
    assert policy.for_output("emb").min_cosine == 0.98
    assert policy.for_output("logits").min_cosine == 0.98
    assert policy.for_output("logits").min_top1_agreement == 0.995
    assert policy.metric is not None and policy.metric.max_drop == 0.005
    # a per-output limit that cannot judge its output, or an unknown output: refused
    with pytest.raises(BudgetError, match="cannot judge output 'emb'"):
        parse_budget("emb:argmax>=0.99").to_policy(facts)
    with pytest.raises(BudgetError, match=r"output\(s\) \['nope'\]"):
        parse_budget("nope:abs<=0.1").to_policy(facts)


def test_a_matcher_is_judged_by_its_decisions_and_its_score(tmp_path: Path):
    # setup: 300 similarities; the candidate moves each by <= 0.015, and flips 2 decisions at 0.5
    ref = {"similarity": np.linspace(-0.2, 0.95, 300).astype(np.float32)}
    away = np.abs(ref["similarity"] - 0.5) > 0.02  # noise there cannot flip a decision
    moved = ref["similarity"] + away * RNG.uniform(-0.015, 0.015, 300).astype(np.float32)
    near = np.argsort(np.abs(ref["similarity"] - 0.5))[:2]
    moved[near] = np.where(ref["similarity"][near] >= 0.5, 0.499, 0.5)
    facts = output_facts(ref)
    matcher = parse_budget("similarity:decision>=0.99@0.5,similarity:abs<=0.02").to_policy(facts)
    strict = parse_budget("similarity:decision>=1@0.5,similarity:abs<=0.02").to_policy(facts)
    # execute
    ok = accuracy_gate("c", {"similarity": moved}, ref, matcher, False, gx_dir=tmp_path)
    flips = accuracy_gate("c", {"similarity": moved}, ref, strict, False)
    far = accuracy_gate("c", {"similarity": ref["similarity"] + 0.03}, ref, matcher, False)
    # assert: the GX suite is the verdict, and the numpy judge agrees with it
    assert ok.report.passed, ok.report.reason
    assert ok.table["similarity.decision_agree"].mean() == pytest.approx(298 / 300)
    assert not flips.report.passed
    assert "decision (>= 0.5) agrees with the source on >= 1" in flips.suite.failed_names()
    assert not far.report.passed and "|candidate - source| <= 0.02" in far.suite.failed_names()
    for outcome, policy, got in [
        (ok, matcher, moved),
        (flips, strict, moved),
        (far, matcher, ref["similarity"] + 0.03),
    ]:
        assert judge("c", {"similarity": got}, ref, policy).passed == outcome.report.passed


def test_prob_drift_measures_probabilities_after_softmax():
    # setup: logits whose argmax never changes, but one sample's probabilities move by ~0.1
    logits = np.tile(np.array([[3.0, 1.0, 0.0]], np.float32), (50, 1))
    got = logits.copy()
    got[7] = [2.4, 1.0, 0.0]
    policy = parse_budget("argmax>=0.99,prob_drift<=0.02").to_policy(
        output_facts({"logits": logits})
    )
    # execute
    outcome = accuracy_gate("c", {"logits": got}, {"logits": logits}, policy, False)
    # assert: argmax agrees everywhere; the drift of sample 7 fails the gate
    assert outcome.table["logits.top1_agree"].mean() == 1.0
    drift = outcome.table["logits.prob_drift"]
    assert drift[7] == pytest.approx(0.1, abs=0.02) and drift.drop(7).max() == 0.0
    assert not outcome.report.passed
    assert "class probabilities move by <= 0.02" in outcome.suite.failed_names()
    assert "class probabilities move by <= 0.02 for every sample: worst 0.096" in (
        outcome.report.reason
    )


def _embedder(path: Path, features: int = 32, dim: int = 48) -> Path:
    """x -> MatMul -> Relu -> MatMul -> 'sentence_embedding' [batch, dim] (int8-quantizable)."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((features, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, dim)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["e"], name="mm2"),
            helper.make_node("Identity", ["e"], ["sentence_embedding"], name="out"),
        ],
        "embedder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", dim])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_producers_look_through_shape_only_ops(tmp_path: Path):
    assert producers(_embedder(tmp_path / "e.onnx")) == {"sentence_embedding": "MatMul"}


def test_recovery_searches_against_the_run_budget(tmp_path: Path):
    # setup: int8 of the embedder keeps cosine >= 0.99 but not the exact elementwise gate
    from bladeflow.core.contract import DataRef
    from bladeflow.tasks.optimize.base import PassContext
    from bladeflow.tasks.optimize.recipes import build_candidate, parse_passes
    from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, predict
    from tests.optimize.conftest import prepare

    prepared = prepare(_embedder(tmp_path / "e.onnx"), tmp_path, samples=32)
    resolved = resolve_budget(AccuracyBudget(), prepared.reference, prepared.model.path)
    exact = OptimizeParams(source="m", name="m", tolerance={}).effective_policy()

    def context(policy: TolerancePolicy) -> PassContext:
        return PassContext(
            data=DataRef(path=str(prepared.data_path), samples=32, synthetic=False),
            reference_path=str(prepared.reference_path),
            policy=policy,
            time_budget_s=60,
        )

    # execute
    built = {
        label: build_candidate(
            parse_passes("mixed_precision")[0], prepared.model, tmp_path / label, context(p)
        )
        for label, p in [("budget", resolved.policy), ("exact", exact)]
    }
    # assert: under the budget, int8 everywhere passes; under the exact gate recovery keeps
    # nodes in fp32 -- each search judged with the same limits as its final gate
    assert resolved.policy.budget == "sentence_embedding:cosine>=0.99"
    details = {
        k: json.loads((Path(c.artifact.path).parent / "pass_config.json").read_text())["details"]
        for k, c in built.items()
    }
    assert details["budget"]["fp32_nodes"] == [] and details["budget"]["passed_gate"]
    assert details["exact"]["fp32_nodes"] != []
    got = predict(built["budget"].artifact, REFERENCE_SESSION, prepared.data)
    assert judge("c", got, prepared.reference, resolved.policy).passed
    assert not judge("c", got, prepared.reference, exact).passed


@pytest.mark.slow  # a whole flow run: ~50 s here (registration included)
@pytest.mark.usefixtures("prefect_harness")
def test_flow_resolves_the_default_budget_and_records_it(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
):
    # setup: an embedder with real (non-synthetic) data, int8 as the only optimized candidate
    from mlflow import MlflowClient

    from bladeflow.flows.optimize import optimize_flow

    src = _embedder(tmp_path / "emb.onnx")
    data = tmp_path / "val.npz"
    np.savez(data, x=RNG.standard_normal((40, 32)).astype(np.float32))
    params = OptimizeParams(
        source=str(src),
        name="emb",
        data=str(data),
        passes="int8_dynamic:per_channel=true",
        batch_sizes=[1],
        bench=bench_fast,
    )
    # execute
    result = optimize_flow(params)
    # assert: int8 passed the embedding's default budget (the exact gate would refuse it)
    validate = next(s for s in result.stages if s.stage == "validate")
    assert validate.metrics == {"baseline.passed": 1.0, "int8_dynamic-per_channeltrue.passed": 1.0}
    run = MlflowClient(settings.tracking_uri).get_run(result.run_id)
    assert run.data.params["accuracy"] == "auto"
    assert run.data.params["accuracy_budget"] == "sentence_embedding:cosine>=0.99"
    policy = json.loads(run.data.params["policy"])
    assert policy["outputs"]["sentence_embedding"]["min_cosine"] == 0.99
