"""Latency and throughput of several models, measured interleaved on the same inputs.

These machines are shared and noisy: timing model A fully and then model B lets a burst of other
load land on one of them. So every round runs every model once per batch size (A B A B ...), each
model's timings are pooled over the rounds, and medians are reported. Each model's median in each
round is kept too (``LatencyStats.round_medians_ms``): paired by round, they give a speedup with a
confidence interval (``bladeflow.core.stats``). The order of the models rotates from round to round
so that no model always runs right after the same neighbour (spinning threads slow the next one).

When a decision is still undecided after the planned rounds (its interval straddles the threshold),
``more`` names the batch size that needs more rounds, and rounds are added there until it is
decided or ``extra_seconds`` is spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bladeflow.core.contract import BenchmarkReport, LatencyStats, ModelArtifact, SessionConfig
from bladeflow.core.runtime import make_session
from bladeflow.tasks.validate.data import Dataset, fixed_batch, tile, trim_padding


@dataclass(frozen=True)
class BenchmarkSettings:
    """How long to measure. Defaults fit small models; the CLI exposes each."""

    warmup: int = 5
    rounds: int = 5
    iterations: int = 20  # per model, per batch size, per round
    max_seconds: float = 10.0  # per model and batch size, across rounds: caps big models
    extra_seconds: float = 0.0  # budget for rounds added while `more` says undecided (0: none)
    max_rounds: int = 50  # at most this many rounds per batch size, extra ones included


MoreRounds = Callable[[BenchmarkReport], int | None]
"""Given the report so far: the batch size that needs more rounds to decide, or None."""


def benchmark(
    models: dict[str, tuple[ModelArtifact, SessionConfig]],
    data: Dataset,
    batch_sizes: list[int],
    settings: BenchmarkSettings = BenchmarkSettings(),
    progress: Callable[[str], None] | None = None,
    runners: Mapping[str, Callable[[Dataset], Any]] | None = None,
    more: MoreRounds | None = None,
) -> BenchmarkReport:
    """Time each model at each batch size on batches drawn from ``data``.

    Args:
        models: Label -> (artifact, session config). All must share one signature.
        data: Samples to batch up (real data keeps real shapes, e.g. short sequences).
        batch_sizes: Batch sizes to time; sizes the model cannot take are skipped with a reason.
        settings: Warm-up, rounds, iterations and time cap.
        progress: Called with a line of text as each batch size starts.
        runners: Extra label -> callable(feeds) timed alongside, e.g. the source framework's
            eager model, so the report shows source-framework vs optimized latency.
        more: Asked after the planned rounds (and after each added one) which batch size still
            needs rounds to decide; see ``bladeflow.tasks.benchmark.select.more_rounds``.
    """
    first = next(iter(models.values()))[0]
    fixed = fixed_batch(first.signature)
    skipped: dict[int, str] = {}
    sizes = []
    for bs in batch_sizes:
        if fixed is not None and bs != fixed:
            skipped[bs] = f"the model's batch dimension is fixed at {fixed}"
        else:
            sizes.append(bs)
    if fixed is not None and fixed not in sizes:
        sizes.append(fixed)

    # inputs whose sequence axis is dynamic: a batch is timed at its own longest text
    dynamic = {
        i.name
        for i in first.signature.inputs
        if len(i.shape) >= 2 and not isinstance(i.shape[1], int)
    }
    calls: dict[str, Callable[[Dataset], Any]] = dict(runners or {})
    for label, (artifact, cfg) in models.items():
        calls[label] = _session_call(artifact, cfg)
    timings: dict[str, dict[int, list[list[float]]]] = {label: {} for label in calls}
    budget = settings.max_seconds / max(settings.rounds, 1)
    for bs in sizes:
        if progress:
            progress(f"benchmark: batch size {bs}, {len(calls)} models interleaved")
        feeds = trim_padding(tile(data, bs), dynamic)
        for label, call in calls.items():
            for _ in range(settings.warmup):
                call(feeds)
            timings[label][bs] = []
        for _ in range(settings.rounds):
            _round(calls, feeds, bs, timings, settings.iterations, budget)

    sequential = more is not None and settings.extra_seconds > 0

    def report() -> BenchmarkReport:
        return BenchmarkReport(
            models={
                label: {bs: _stats(bs, rounds) for bs, rounds in per.items()}
                for label, per in timings.items()
            },
            skipped_batch_sizes=skipped,
            shapes={k: list(v.shape[1:]) for k, v in trim_padding(tile(data, 1), dynamic).items()},
            planned_rounds=settings.rounds if sequential else None,
        )

    deadline = time.perf_counter() + settings.extra_seconds
    added = 0
    while more is not None and settings.extra_seconds > 0 and time.perf_counter() < deadline:
        bs_more = more(report())
        if bs_more is None or bs_more not in sizes:
            break
        done = len(next(iter(timings.values()))[bs_more])
        if done >= settings.max_rounds:
            break
        if progress and done == settings.rounds:
            progress(
                f"benchmark: undecided at batch size {bs_more} after {done} rounds, adding "
                f"rounds for up to {settings.extra_seconds:g} s"
            )
        feeds = trim_padding(tile(data, bs_more), dynamic)
        _round(calls, feeds, bs_more, timings, settings.iterations, budget)
        added = max(added, done + 1 - settings.rounds)
    if progress and added:
        progress(f"benchmark: {added} rounds added")
    return report()


def _round(
    calls: dict[str, Callable[[Dataset], Any]],
    feeds: Dataset,
    bs: int,
    timings: dict[str, dict[int, list[list[float]]]],
    iterations: int,
    budget: float,
) -> None:
    """One round at batch ``bs``: every model once, in an order rotated by the round number."""
    labels = list(calls)
    shift = len(next(iter(timings.values()))[bs]) % len(labels)
    for label in labels[shift:] + labels[:shift]:
        call, times = calls[label], []
        round_start = time.perf_counter()
        for _ in range(iterations):
            t0 = time.perf_counter()
            call(feeds)
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1000.0)
            if t1 - round_start > budget:
                break
        timings[label][bs].append(times)


def _session_call(artifact: ModelArtifact, config: SessionConfig) -> Callable[[Dataset], Any]:
    session = make_session(artifact.path, config)
    names = [o.name for o in artifact.signature.outputs]
    return lambda feeds: session.run(names, feeds)


def _stats(batch_size: int, rounds: list[list[float]]) -> LatencyStats:
    arr = np.asarray([t for r in rounds for t in r])
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return LatencyStats(
        batch_size=batch_size,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=float(arr.mean()),
        throughput=float(batch_size * 1000.0 / p50) if p50 > 0 else 0.0,
        iterations=len(arr),
        round_medians_ms=[float(np.median(r)) for r in rounds],
    )
