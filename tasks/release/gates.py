"""Judge one stage from the metrics of its window: pass, fail (with reasons), or keep waiting.

The new version is compared with the champion over the same window: 5xx share, p99 latency and
(when requests are mirrored) output agreement. In a shadow stage the new version answers only
mirrored requests (role ``shadow``); in a weighted stage it answers real ones (role ``canary``).
When the champion got too little traffic in this window (the 100% stage), the champion's numbers
from an earlier stage are the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from pydantic import BaseModel, Field

from bladeflow.tasks.release.metrics import Key, RoleStats, agreement, role_stats
from bladeflow.tasks.release.plan import GatePolicy, StagePlan


class Decision(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"  # not judged yet: too early or too little traffic


class GateResult(BaseModel):
    """One gate: its value, the threshold it was held to and whether it held."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str = ""


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
    p99 = canary.quantile(0.99)
    champion_p99 = champion.quantile(0.99) if champion is not None else None
    if latency_ready and p99 is not None and champion_p99 is not None:
        limit = champion_p99 * (1 + policy.p99_epsilon) + policy.p99_slack_ms / 1000
        gates.append(
            GateResult(
                name="p99_latency",
                passed=p99 <= limit,
                value=p99,
                threshold=limit,
                detail=f"p99 {p99 * 1000:.1f} ms (limit {limit * 1000:.1f} ms: champion "
                f"{champion_p99 * 1000:.1f} ms x {1 + policy.p99_epsilon:g} + "
                f"{policy.p99_slack_ms:g} ms)",
            )
        )
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
