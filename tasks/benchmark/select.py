"""Choosing from timings: which passing candidate wins, and whether it beats the incumbent.

The optimize flow hands over the benchmark report and gets back a decision with its reason; the
rules live here, in one place, so the nightly flow, ``--must-beat`` and the candidate table agree.
Every comparison is a speedup with its interval over the benchmark's paired rounds
(``bladeflow.core.stats``), never one ratio of medians: on a shared machine a 6% "win" is noise.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from bladeflow.core.contract import BenchmarkReport, Candidate, PassRecord
from bladeflow.core.params import Objective
from bladeflow.core.stats import (
    CONFIDENCE,
    Speedup,
    Verdict,
    paired_speedup,
    sequential_confidence,
)

BASELINE = "baseline"  # the unoptimized candidate: always eligible

# Simplicity, for breaking ties: reduced precision and custom ops are kept only when they win.
_PRECISION_RANK = {"fp16": 1, "mixed_precision": 1, "int8_dynamic": 2, "int8_static": 2}
_CUSTOM_OPS = {"transformer_fusion", "tensorrt"}  # com.microsoft contrib ops, TensorRT engines


class Judgement(BaseModel):
    """Whether the chosen candidate beats the incumbent by ``min_speedup``, and why.

    ``improved`` only when the interval's low end is at least ``min_speedup``.
    """

    speedup: float
    improved: bool
    reason: str
    ci: tuple[float, float] = (0.0, float("inf"))
    verdict: Verdict = Verdict.TIE
    rounds: int = 0


def speedup_at(
    bench: BenchmarkReport, new: str, old: str, batch: int, planned_rounds: int | None = None
) -> Speedup:
    """``old/new`` latency at ``batch`` with its interval over the paired rounds.

    Throughput is batch / latency, so the same ratio serves both objectives. A report without
    per-round medians (an older run, an older remote worker) gives the plain ratio of medians as
    a zero-width interval: the decision falls back to the point estimate, as before intervals.
    ``planned_rounds``: the benchmark started with this many rounds and added more until the
    decision was made, so the interval uses ``sequential_confidence`` (wider) to stay honest;
    unset, the report's own ``planned_rounds`` (set by a benchmark that could add rounds).
    """
    a, b = bench.models[new][batch], bench.models[old][batch]
    if planned_rounds is None:
        planned_rounds = bench.planned_rounds
    if len(a.round_medians_ms) == len(b.round_medians_ms) and a.round_medians_ms:
        confidence = (
            CONFIDENCE
            if planned_rounds is None
            else sequential_confidence(len(a.round_medians_ms), planned_rounds)
        )
        return paired_speedup(a.round_medians_ms, b.round_medians_ms, confidence)
    ratio = b.p50_ms / a.p50_ms if a.p50_ms else 0.0
    return Speedup(ratio, ratio, ratio, 0)


def simplicity(c: Candidate) -> tuple[int, int, int]:
    """Sort key, simplest first: fewer passes, then fp32 over fp16 over int8, then no custom ops."""
    return (
        len(c.recipe),
        max((_PRECISION_RANK.get(p.name, 0) for p in c.recipe), default=0),
        sum(_custom_ops(p) for p in c.recipe),
    )


def _custom_ops(p: PassRecord) -> int:
    return int(p.name in _CUSTOM_OPS)


def select_candidate(
    passing: list[Candidate], bench: BenchmarkReport, objective: Objective
) -> Candidate:
    """The simplest passing candidate that no other candidate is significantly faster than.

    The fastest is the one with the best point estimate on the objective; every eligible candidate
    that no other one beats significantly (paired interval above 1) is a tie with it, and ties go
    to the simplest recipe (``simplicity``, then the earlier candidate), so the result is the same
    from run to run. (Judging ties only against the fastest let a simple candidate that another
    one beat significantly win on a wide interval: seen on MiniLM, int8-recovered chosen although
    smooth-int8-recovered was x1.57 [1.16-2.13] faster in the same rounds.)
    Candidates significantly slower than the unoptimized baseline at another measured batch size
    are not eligible (the baseline itself always is), so the choice never regresses a batch size
    the user asked to measure for a win at the objective's.
    """
    eligible = [c for c in passing if not_eligible_reason(bench, c.name, objective) is None]
    pool = eligible or passing
    batch = _batch(bench, pool[0].name, objective)

    def score(c: Candidate) -> float:
        stats = objective.stats(bench, c.name)
        return stats.p50_ms if objective.kind == "latency" else -stats.throughput

    fastest = min(pool, key=score)

    def beaten(c: Candidate) -> bool:  # another candidate is significantly faster than c
        return any(
            d is not c and speedup_at(bench, d.name, c.name, batch).verdict is Verdict.FASTER
            for d in pool
        )

    ties = [c for c in pool if c is fastest or not beaten(c)]
    order = {c.name: i for i, c in enumerate(pool)}
    return min(ties, key=lambda c: (*simplicity(c), order[c.name]))


def not_eligible_reason(bench: BenchmarkReport, name: str, objective: Objective) -> str | None:
    """Why a passing candidate was excluded by the batch-size guard, or None."""
    if name == BASELINE:
        return None
    return bench.slower_than(name, BASELINE, skip=[objective.batch])


def judge_incumbent(
    bench: BenchmarkReport,
    chosen: str,
    incumbent_label: str,
    incumbent_version: str,
    objective: Objective,
    min_speedup: float,
    planned_rounds: int | None = None,
) -> Judgement:
    """Speedup of ``chosen`` over the incumbent timed in the same run, against ``min_speedup``.

    Improved only when the low end of the interval is at least ``min_speedup``; otherwise the
    reason carries the interval, so a 6% difference on a machine with more noise than that is
    not a new version.
    """
    sp = speedup_at(
        bench, chosen, incumbent_label, _batch(bench, chosen, objective), planned_rounds
    )
    improved = sp.at_least(min_speedup)
    where = f"{objective.kind}@{objective.batch}"
    reason = (
        f"{chosen} is {sp.text()} v{incumbent_version} at {where} "
        f"({percent(sp.confidence)} interval over {sp.rounds} paired rounds)"
    )
    if not improved:
        reason += (
            f", low end below min_speedup {min_speedup}: nothing registered"
            if sp.lo < min_speedup <= sp.hi
            else f", below min_speedup {min_speedup}: nothing registered"
        )
    return Judgement(
        speedup=sp.estimate,
        improved=improved,
        reason=reason,
        ci=sp.ci,
        verdict=sp.verdict,
        rounds=sp.rounds,
    )


def more_rounds(
    passing: list[Candidate],
    objective: Objective,
    incumbent_label: str | None = None,
    min_speedup: float = 1.0,
    planned_rounds: int | None = None,
) -> Callable[[BenchmarkReport], int | None]:
    """For ``benchmark(more=...)``: the objective's batch while the decision is undecided.

    Undecided: with an incumbent, the chosen candidate's interval against it straddles
    ``min_speedup``; without one, the fastest candidate's interval against the baseline straddles
    1 (an optimization that may be noise). More rounds narrow the interval; the benchmark stops
    adding them at its ``extra_seconds`` budget. With ``planned_rounds`` the incumbent decision
    uses the sequential confidence (see ``speedup_at``), the same one ``judge_incumbent`` must use.
    """

    def more(bench: BenchmarkReport) -> int | None:
        timed = [c for c in passing if c.name in bench.models]
        if not timed:
            return None
        chosen = select_candidate(timed, bench, objective)
        batch = _batch(bench, chosen.name, objective)
        if incumbent_label is not None and incumbent_label in bench.models:
            sp = speedup_at(bench, chosen.name, incumbent_label, batch, planned_rounds)
            return None if sp.decided(min_speedup) else batch
        if _open_tie(bench, timed, chosen, batch):
            return batch
        if chosen.name == BASELINE or BASELINE not in bench.models:
            return None
        return None if speedup_at(bench, chosen.name, BASELINE, batch).decided() else batch

    return more


# Two candidates within this factor of each other are the same speed for the choice: once the
# interval of a faster-looking one against the chosen one lies below it, more rounds cannot matter.
SAME_SPEED = 1.05


def _open_tie(
    bench: BenchmarkReport, timed: list[Candidate], chosen: Candidate, batch: int
) -> bool:
    """True while a faster-looking candidate ties with the chosen one but may still be faster by
    more than ``SAME_SPEED``: the choice rests on too few rounds (seen on MiniLM: 5 rounds chose
    int8-recovered twice, then smooth-int8-recovered, a x1.5 faster one, the third time)."""
    for d in timed:
        if d is chosen or batch not in bench.models.get(d.name, {}):
            continue
        sp = speedup_at(bench, d.name, chosen.name, batch)
        if sp.estimate > 1.0 and sp.verdict is Verdict.TIE and sp.hi >= SAME_SPEED:
            return True
    return False


def percent(confidence: float) -> str:
    """0.95 -> ``95%``, 0.99875 -> ``99.875%``: the stated confidence, without float noise."""
    return f"{confidence * 100:.3f}".rstrip("0").rstrip(".") + "%"


def _batch(bench: BenchmarkReport, name: str, objective: Objective) -> int:
    """The objective's batch size (the smallest measured one if absent), as Objective.stats."""
    per = bench.models[name]
    return objective.batch if objective.batch in per else min(per)


def screen(passing: list[Candidate], bench: BenchmarkReport) -> dict[str, str]:
    """Candidates a short screening run shows are not worth a full benchmark, with the reason.

    A candidate is dropped only when another one is significantly faster than it at EVERY batch
    size the screening run measured (dominated). The optimize flow screens at the objective's
    batch size only, so a dropped candidate is one the choice could not pick anyway; should the
    batch-size guard later exclude the one that beat it, the next choice comes from those timed
    in full (the baseline at worst). The baseline is never dropped (it is the reference every
    speedup is measured against).
    """
    timed = [c for c in passing if c.name in bench.models]
    dropped: dict[str, str] = {}
    for c in timed:
        if c.name == BASELINE:
            continue
        for d in timed:
            if d is c or d.name in dropped:
                continue
            gaps = _dominates(bench, d.name, c.name)
            if gaps:
                dropped[c.name] = (
                    f"screened out: {d.name} was significantly faster at every batch size of a "
                    f"short screening run ({gaps}), so {c.name} was not timed in full"
                )
                break
    return dropped


def _dominates(bench: BenchmarkReport, fast: str, slow: str) -> str | None:
    """``batch: speedup [lo-hi]`` per batch when ``fast`` beats ``slow`` at each one, else None."""
    mine, theirs = bench.models.get(fast, {}), bench.models.get(slow, {})
    sizes = sorted(set(mine) & set(theirs))
    if not sizes or set(sizes) != set(theirs):
        return None
    parts = []
    for bs in sizes:
        a, b = mine[bs].round_medians_ms, theirs[bs].round_medians_ms
        if len(a) < 2 or len(a) != len(b):
            return None
        sp = paired_speedup(a, b)
        if sp.verdict is not Verdict.FASTER:
            return None
        parts.append(f"batch {bs}: {sp.text()}")
    return "; ".join(parts)
