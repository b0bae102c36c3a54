"""Choosing from timings: which passing candidate wins, and whether it beats the incumbent.

The optimize flow hands over the benchmark report and gets back a decision with its reason; the
rules live here, in one place, so the nightly flow, ``--must-beat`` and the candidate table agree.
"""

from __future__ import annotations

from pydantic import BaseModel

from bladeflow.core.contract import BenchmarkReport, Candidate
from bladeflow.core.params import Objective

BASELINE = "baseline"  # the unoptimized candidate: always eligible


class Judgement(BaseModel):
    """Whether the chosen candidate beats the incumbent by ``min_speedup``, and why."""

    speedup: float
    improved: bool
    reason: str


def select_candidate(
    passing: list[Candidate], bench: BenchmarkReport, objective: Objective
) -> Candidate:
    """The best passing candidate on the objective; ties go to the earlier (simpler) recipe.

    Candidates more than 10% slower than the unoptimized baseline at another measured batch size
    are not eligible (the baseline itself always is), so the choice never regresses a batch size
    the user asked to measure for a win at the objective's.
    """

    def score(c: Candidate) -> float:
        stats = objective.stats(bench, c.name)
        return stats.p50_ms if objective.kind == "latency" else -stats.throughput

    eligible = [
        c for c in passing if not bench.slower_than(c.name, BASELINE, skip=[objective.batch])
    ]
    return min(eligible or passing, key=score)


def not_eligible_reason(bench: BenchmarkReport, name: str, objective: Objective) -> str | None:
    """Why a passing candidate was excluded by the batch-size guard, or None."""
    return bench.slower_than(name, BASELINE, skip=[objective.batch])


def judge_incumbent(
    bench: BenchmarkReport,
    chosen: str,
    incumbent_label: str,
    incumbent_version: str,
    objective: Objective,
    min_speedup: float,
) -> Judgement:
    """Speedup of ``chosen`` over the incumbent timed in the same run, against ``min_speedup``."""
    speedup = objective.speedup(bench, chosen, incumbent_label)
    improved = speedup >= min_speedup
    reason = (
        f"{chosen} is x{speedup:.2f} v{incumbent_version} at {objective.kind}@{objective.batch}"
        + ("" if improved else f", below min_speedup {min_speedup}: nothing registered")
    )
    return Judgement(speedup=speedup, improved=improved, reason=reason)
