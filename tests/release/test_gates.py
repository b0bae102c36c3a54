"""Gate logic on Prometheus text made by serving's own metric objects (no Prefect, no MLflow)."""

from __future__ import annotations

import pytest

from bladeflow.core.release_plan import GatePolicy, ReleasePlan, StagePlan, load_plan
from bladeflow.serving.metrics import Metrics
from bladeflow.tasks.release import metrics
from bladeflow.tasks.release.gates import Decision, champion_reference, judge

MODEL = "m"
CANARY_STAGE = StagePlan(
    name="canary-25", weight=25, min_duration_s=10, max_duration_s=60, min_requests=100
)
SHADOW_STAGE = StagePlan(
    name="shadow", weight=0, shadow_share=50, min_duration_s=10, max_duration_s=60, min_requests=100
)


def traffic(
    m: Metrics,
    version: str,
    role: str,
    n: int,
    seconds: float = 0.004,
    errors: int = 0,
    agree: int | None = None,
) -> None:
    """Record ``n`` requests (``errors`` of them 500) of ``seconds`` each."""
    for i in range(n):
        status = "500" if i < errors else "200"
        m.requests.labels(MODEL, version, role, status).inc()
        m.request_duration.labels(MODEL, version, role).observe(seconds)
    if agree is not None:
        m.shadow_comparisons.labels(MODEL, version, "true").inc(agree)
        m.shadow_comparisons.labels(MODEL, version, "false").inc(n - agree)


def window(before: str, after: str) -> metrics.Samples:
    return metrics.total([metrics.delta(metrics.parse(before, MODEL), metrics.parse(after, MODEL))])


def judge_canary(
    canary_seconds: float = 0.004, canary_errors: int = 0, elapsed: float = 30
) -> Decision | tuple[Decision, str]:
    # setup: both versions already served traffic before the stage (must not count)
    m = Metrics()
    traffic(m, "1", "champion", 500, errors=400)
    before = m.render().decode()
    traffic(m, "1", "champion", 300, seconds=0.004, errors=1)
    traffic(m, "2", "canary", 100, seconds=canary_seconds, errors=canary_errors)
    # execute
    w = window(before, m.render().decode())
    v = judge(w, CANARY_STAGE, GatePolicy(), "2", champion_reference(w, "1", 100), elapsed)
    return v.decision, v.reason


def test_good_canary_passes():
    decision, reason = judge_canary()
    assert decision == Decision.PASS, reason


def test_good_canary_waits_for_the_minimum_duration():
    decision, reason = judge_canary(elapsed=5)
    assert decision == Decision.WAIT and "gates hold" in reason


def test_5xx_heavy_canary_fails_on_error_rate():
    decision, reason = judge_canary(canary_errors=5)
    assert decision == Decision.FAIL
    assert "5xx share 5.00%" in reason and "p99" not in reason


def test_slow_canary_fails_on_p99():
    decision, reason = judge_canary(canary_seconds=0.04)
    assert decision == Decision.FAIL
    assert "p99" in reason and "5xx" not in reason


def test_disagreeing_shadow_fails_on_agreement():
    # setup
    m = Metrics()
    before = m.render().decode()
    traffic(m, "1", "champion", 400)
    traffic(m, "2", "shadow", 200, agree=190)
    w = window(before, m.render().decode())
    # execute
    v = judge(w, SHADOW_STAGE, GatePolicy(), "2", champion_reference(w, "1", 100), 30)
    # assert
    assert v.decision == Decision.FAIL
    assert [g.name for g in v.gates if not g.passed] == ["agreement"]
    assert v.metrics["agreement"] == pytest.approx(0.95)


def test_agreeing_shadow_passes():
    m = Metrics()
    before = m.render().decode()
    traffic(m, "1", "champion", 400)
    traffic(m, "2", "shadow", 200, agree=200)
    w = window(before, m.render().decode())
    v = judge(w, SHADOW_STAGE, GatePolicy(), "2", champion_reference(w, "1", 100), 30)
    assert v.decision == Decision.PASS, v.reason


def test_too_little_traffic_waits_and_says_how_much():
    m = Metrics()
    before = m.render().decode()
    traffic(m, "2", "canary", 40, errors=40)  # failing, but too few to judge
    w = window(before, m.render().decode())
    v = judge(w, CANARY_STAGE, GatePolicy(), "2", None, 1000)
    assert v.decision == Decision.WAIT and not v.enough_traffic
    assert "40 of 100 canary requests" in v.reason


def test_replicas_are_summed_and_a_restarted_replica_counts_from_zero():
    # setup: replica A keeps running; replica B restarts during the stage
    a, b = Metrics(), Metrics()
    traffic(a, "2", "canary", 50)
    traffic(b, "2", "canary", 500)
    base = {"a": metrics.parse(a.render().decode(), MODEL)}
    base["b"] = metrics.parse(b.render().decode(), MODEL)
    traffic(a, "2", "canary", 30)
    b = Metrics()  # restarted: counters start again
    traffic(b, "2", "canary", 20, errors=2)
    now = {"a": metrics.parse(a.render().decode(), MODEL)}
    now["b"] = metrics.parse(b.render().decode(), MODEL)
    # execute
    w = metrics.total(metrics.delta(base[k], now[k]) for k in now)
    stats = metrics.role_stats(w, "2", {"canary"})
    # assert
    assert stats.requests == 50 and stats.errors == 2


def test_quantile_interpolates_like_promql():
    stats = metrics.RoleStats(buckets={0.01: 50.0, 0.02: 100.0, float("inf"): 100.0})
    assert stats.quantile(0.5) == pytest.approx(0.01)
    assert stats.quantile(0.75) == pytest.approx(0.015)
    assert metrics.RoleStats().quantile(0.99) is None


def test_at_full_weight_the_earlier_champion_numbers_are_the_reference():
    # setup: the champion gets no traffic at 100%; its numbers come from the previous stage
    m = Metrics()
    traffic(m, "1", "champion", 200, seconds=0.004)
    ref = champion_reference(window("", m.render().decode()), "1", 100)
    m2 = Metrics()
    traffic(m2, "2", "canary", 200, seconds=0.2)
    full = StagePlan(name="full", weight=100, min_duration_s=0, max_duration_s=9, min_requests=100)
    # execute
    w = window("", m2.render().decode())
    v = judge(w, full, GatePolicy(), "2", champion_reference(w, "1", 100) or ref, 10)
    # assert
    assert ref is not None and v.decision == Decision.FAIL and "p99" in v.reason


def test_plan_validation_and_presets(tmp_path):
    assert [s.weight for s in ReleasePlan().stages] == [0, 5, 25, 50, 100]
    assert load_plan("fast").stages[0].shadow_share == 100
    bad = tmp_path / "plan.yaml"
    bad.write_text(
        "stages:\n  - {name: a, weight: 50, min_duration_s: 1, max_duration_s: 2, "
        "min_requests: 1}\n  - {name: b, weight: 5, min_duration_s: 1, "
        "max_duration_s: 2, min_requests: 1}\n"
    )
    with pytest.raises(Exception, match="must not decrease"):
        load_plan(str(bad))


def test_canary_that_refuses_inputs_the_champion_takes_fails_on_4xx():
    # setup: serving answers 400 when ONNX Runtime rejects an input (InvalidArgument)
    m = Metrics()
    before = m.render().decode()
    traffic(m, "1", "champion", 300)
    for _ in range(30):
        m.requests.labels(MODEL, "2", "canary", "400").inc()
    traffic(m, "2", "canary", 100)
    w = window(before, m.render().decode())
    # execute
    v = judge(w, CANARY_STAGE, GatePolicy(), "2", champion_reference(w, "1", 100), 30)
    # assert
    assert v.decision == Decision.FAIL and "4xx share" in v.reason and "5xx" not in v.reason


def test_p99_is_not_judged_on_too_few_latency_samples():
    # setup: 30 slow canary requests: enough for error rates, too few for a p99
    m = Metrics()
    before = m.render().decode()
    traffic(m, "1", "champion", 300)
    traffic(m, "2", "canary", 30, seconds=0.5)
    w = window(before, m.render().decode())
    stage = CANARY_STAGE.model_copy(update={"min_requests": 20})
    # execute
    v = judge(w, stage, GatePolicy(), "2", champion_reference(w, "1", 20), 30)
    # assert
    assert v.decision == Decision.WAIT and "30 of 100 latency samples" in v.reason
    assert not v.enough_traffic


def test_p99_over_the_limit_by_a_few_slow_requests_waits_instead_of_failing():
    # setup: 3 of 100 canary requests slow: p99 is over the limit, but on 100 samples its
    # interval reaches well below it (the old single-number gate failed this stage)
    m = Metrics()
    before = m.render().decode()
    traffic(m, "1", "champion", 300)
    traffic(m, "2", "canary", 97)
    traffic(m, "2", "canary", 3, seconds=0.009)
    w = window(before, m.render().decode())
    # execute
    v = judge(w, CANARY_STAGE, GatePolicy(), "2", champion_reference(w, "1", 100), 30)
    # assert
    gate = next(g for g in v.gates if g.name == "p99_latency")
    assert v.decision == Decision.WAIT and "undecided" in v.reason, v.reason
    assert gate.value is not None and gate.threshold is not None and gate.value > gate.threshold
    assert gate.interval is not None and gate.interval[0] < gate.threshold < gate.interval[1]
    assert not v.enough_traffic  # at max_duration the plan's on_insufficient_traffic decides
    # setup: 30x more traffic with the same 3% slow: now significantly over the limit
    traffic(m, "1", "champion", 3000)
    traffic(m, "2", "canary", 2900)
    traffic(m, "2", "canary", 90, seconds=0.009)
    w = window(before, m.render().decode())
    # execute
    v = judge(w, CANARY_STAGE, GatePolicy(), "2", champion_reference(w, "1", 100), 30)
    # assert
    assert v.decision == Decision.FAIL and "significantly over the limit" in v.reason, v.reason
