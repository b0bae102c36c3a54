"""Judge one stage from the metrics of its window: pass, fail (with reasons), or keep waiting.

The new version is compared with the champion over the same window: 5xx share, p99 latency and
(when requests are mirrored) output agreement. In a shadow stage the new version answers only
mirrored requests (role ``shadow``); in a weighted stage it answers real ones (role ``canary``).
When the champion got too little traffic in this window (the 100% stage), the champion's numbers
from an earlier stage are the reference.

p99 is compared with intervals, not single numbers: each version's p99 gets a 95% order-statistic
interval from its scraped histogram (``bladeflow.core.stats.quantile_interval``; the bucket counts
are the whole sample, so no repeated scrapes are needed). The gate fails only when the canary's p99
is above the allowance even at the favourable ends (canary low vs champion high), holds when it is
below at the unfavourable ends, and otherwise waits for more traffic, like too few samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from pydantic import BaseModel, Field

from bladeflow.core.release_plan import GatePolicy, StagePlan
from bladeflow.core.stats import CONFIDENCE, quantile_interval
from bladeflow.tasks.release.metrics import Key, RoleStats, agreement, role_stats


class Decision(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"  # not judged yet: too early or too little traffic


class GateResult(BaseModel):
    """One gate: its value, the threshold it was held to and whether it held.

    ``undecided``: the gate holds so far, but its interval still straddles the threshold (the
    stage waits for more traffic).
    """

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str = ""
    interval: tuple[float, float] | None = None
    undecided: bool = False


class Verdict(BaseModel):
    """A stage's judgement at one moment."""

    decision: Decision
    reason: str = ""
    gates: list[GateResult] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def enough_traffic(self) -> bool:
        return bool(self.metrics.get("enough_traffic", 0.0))


def champion_reference(
    samples: Mapping[Key, float], champion: str | None, min_requests: int
) -> RoleStats | None:
    """The champion's stats in this window if they are enough to compare against."""
    if champion is None:
        return None
    stats = role_stats(samples, champion, {"champion"})
    return stats if stats.requests >= min_requests else None


def judge(
    samples: Mapping[Key, float],
    stage: StagePlan,
    policy: GatePolicy,
    version: str,
    champion: RoleStats | None,
    elapsed_s: float,
) -> Verdict:
    """The verdict on ``version`` after ``elapsed_s`` seconds of ``stage``.

    Args:
        samples: Summed counter deltas of the stage window (all replicas).
        stage: The stage being judged.
        policy: Gate thresholds.
        version: The new version.
        champion: The champion's stats to compare with (this window, else an earlier stage);
            None when there is none (its error rate then counts as 0 and p99 is not compared).
        elapsed_s: Time since the stage's window began.
    """
    role = "shadow" if stage.weight == 0 else "canary"
    canary = role_stats(samples, version, {role})
    agree, compared = agreement(samples, version)
    metrics: dict[str, float] = {
        "weight": float(stage.weight),
        "shadow_share": float(stage.shadow_share),
        "elapsed_s": round(elapsed_s, 3),
        "canary_requests": canary.requests,
        "canary_errors": canary.errors,
        "canary_error_rate": canary.error_rate,
        "canary_rejected_rate": canary.rejected_rate,
        "shadow_comparisons": compared,
    }
    p99 = canary.quantile(0.99)
    if p99 is not None:
        metrics["canary_p99_s"] = p99
    if champion is not None:
        metrics["champion_requests"] = champion.requests
        metrics["champion_error_rate"] = champion.error_rate
        metrics["champion_rejected_rate"] = champion.rejected_rate
        champion_p99 = champion.quantile(0.99)
        if champion_p99 is not None:
            metrics["champion_p99_s"] = champion_p99
    if compared:
        metrics["agreement"] = agree / compared
    enough = canary.requests >= stage.min_requests
    metrics["enough_traffic"] = float(enough)
    if not enough:
        return Verdict(
            decision=Decision.WAIT,
            reason=f"{int(canary.requests)} of {stage.min_requests} {role} requests so far",
            metrics=metrics,
        )
    observed = max(canary.buckets.values(), default=0.0)  # the +Inf bucket: every request
    latency_ready = observed >= policy.min_latency_samples
    gates = _gates(canary, champion, policy, stage, agree, compared, latency_ready)
    failed = [g for g in gates if not g.passed]
    if failed:
        return Verdict(
            decision=Decision.FAIL,
            reason=f"stage {stage.name}: " + "; ".join(g.detail for g in failed),
            gates=gates,
            metrics=metrics,
        )
    undecided = [g for g in gates if g.undecided]
    if latency_ready and undecided:
        metrics["enough_traffic"] = 0.0  # at max_duration: the plan's on_insufficient_traffic
        return Verdict(
            decision=Decision.WAIT,
            reason="; ".join(g.detail for g in undecided),
            gates=gates,
            metrics=metrics,
        )
    if not latency_ready:
        metrics["enough_traffic"] = 0.0
        return Verdict(
            decision=Decision.WAIT,
            reason=f"{int(observed)} of {policy.min_latency_samples} latency samples for p99",
            gates=gates,
            metrics=metrics,
        )
    if elapsed_s < stage.min_duration_s:
        return Verdict(
            decision=Decision.WAIT,
            reason=f"gates hold; {elapsed_s:.0f} of {stage.min_duration_s:.0f} s",
            gates=gates,
            metrics=metrics,
        )
    return Verdict(decision=Decision.PASS, reason="all gates hold", gates=gates, metrics=metrics)


def _gates(
    canary: RoleStats,
    champion: RoleStats | None,
    policy: GatePolicy,
    stage: StagePlan,
    agree: float,
    compared: float,
    latency_ready: bool,
) -> list[GateResult]:
    gates = []
    base_err = champion.error_rate if champion is not None else 0.0
    limit = base_err + policy.max_error_rate_delta
    gates.append(
        GateResult(
            name="error_rate",
            passed=canary.error_rate <= limit,
            value=canary.error_rate,
            threshold=limit,
            detail=f"5xx share {canary.error_rate:.2%} (limit {limit:.2%}: champion "
            f"{base_err:.2%} + {policy.max_error_rate_delta:.2%})",
        )
    )
    base_rej = champion.rejected_rate if champion is not None else 0.0
    limit = base_rej + policy.max_rejected_rate_delta
    gates.append(
        GateResult(
            name="rejected_rate",
            passed=canary.rejected_rate <= limit,
            value=canary.rejected_rate,
            threshold=limit,
            detail=f"4xx share {canary.rejected_rate:.2%} (limit {limit:.2%}: champion "
            f"{base_rej:.2%} + {policy.max_rejected_rate_delta:.2%})",
        )
    )
    if latency_ready and champion is not None:
        gate = p99_gate(canary, champion, policy)
        if gate is not None:
            gates.append(gate)
    if stage.shadow_share > 0:
        if compared:
            share = agree / compared
            gates.append(
                GateResult(
                    name="agreement",
                    passed=share >= policy.min_agreement,
                    value=share,
                    threshold=policy.min_agreement,
                    detail=f"shadow agreement {share:.2%} of {int(compared)} (need "
                    f"{policy.min_agreement:.2%})",
                )
            )
        else:
            gates.append(
                GateResult(
                    name="agreement",
                    passed=False,
                    value=None,
                    threshold=policy.min_agreement,
                    detail="no shadow comparison succeeded (every mirrored request failed?)",
                )
            )
    return gates


def p99_gate(canary: RoleStats, champion: RoleStats, policy: GatePolicy) -> GateResult | None:
    """Canary p99 vs champion p99 x (1 + epsilon) + slack, each p99 with its 95% interval.

    Fails when the canary's low end is above the allowance from the champion's high end;
    undecided (holds, but the stage waits) when the canary's high end is above the allowance from
    the champion's low end. None when either has no latency samples.
    """
    c_ci = quantile_interval(canary.buckets, 0.99)
    h_ci = quantile_interval(champion.buckets, 0.99)
    p99, champion_p99 = canary.quantile(0.99), champion.quantile(0.99)
    if c_ci is None or h_ci is None or p99 is None or champion_p99 is None:
        return None

    def allowance(champion_s: float) -> float:
        return champion_s * (1 + policy.p99_epsilon) + policy.p99_slack_ms / 1000

    failed = c_ci[0] > allowance(h_ci[1])
    undecided = not failed and c_ci[1] > allowance(h_ci[0])
    verdict = (
        "significantly over the limit"
        if failed
        else "undecided, waiting for more samples"
        if undecided
        else "within the limit"
    )
    return GateResult(
        name="p99_latency",
        passed=not failed,
        value=p99,
        threshold=allowance(champion_p99),
        interval=c_ci,
        undecided=undecided,
        detail=f"p99 {p99 * 1000:.1f} ms {_ms(c_ci)} vs limit "
        f"{allowance(champion_p99) * 1000:.1f} ms {_ms((allowance(h_ci[0]), allowance(h_ci[1])))} "
        f"(champion {champion_p99 * 1000:.1f} ms {_ms(h_ci)} x {1 + policy.p99_epsilon:g} + "
        f"{policy.p99_slack_ms:g} ms; {CONFIDENCE:.0%} intervals): {verdict}",
    )


def _ms(ci: tuple[float, float]) -> str:
    return f"[{ci[0] * 1000:.1f}\u2013{ci[1] * 1000:.1f}]"
