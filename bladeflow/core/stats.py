"""Deciding from timings on a noisy machine: a speedup with its confidence interval, and a verdict.

Every timing decision in bladeflow goes through here: which candidate wins, the batch-size guard,
``must_beat``/``min_speedup``, the release p99 gate, and the serving tuner. On a shared machine
the speed drifts by up to 2.5x from minute to minute, so one ratio of two medians can show a 6%
"win" that is only noise. What is comparable is two models timed in the same round: the benchmark
interleaves them, so each round gives one paired ratio, and the drift (common to both) cancels.

The interval is a paired t-interval on the log of the per-round ratios: rounds are few (5-20), where
a bootstrap over rounds is too narrow, and log ratios are symmetric (x2 and x0.5 are as far from 1).
It lives in ``core`` because the release gates and serving may import only ``core``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

CONFIDENCE = 0.95  # the stated confidence of every verdict unless a caller says otherwise
DASH = "\u2013"  # the en dash of "speedup [lo\u2013hi]" in reports


class Verdict(StrEnum):
    """How ``new`` compares with ``old`` at the stated confidence."""

    FASTER = "faster"
    SLOWER = "slower"
    TIE = "no significant difference"


@dataclass(frozen=True)
class Speedup:
    """``old / new`` latency (>1: new is faster) with its confidence interval over paired rounds."""

    estimate: float
    lo: float
    hi: float
    rounds: int
    confidence: float = CONFIDENCE

    @property
    def verdict(self) -> Verdict:
        if self.lo > 1.0:
            return Verdict.FASTER
        if self.hi < 1.0:
            return Verdict.SLOWER
        return Verdict.TIE

    def at_least(self, min_speedup: float) -> bool:
        """True only when the whole interval is at or above ``min_speedup``."""
        return self.lo >= min_speedup

    def decided(self, threshold: float = 1.0) -> bool:
        """True when the interval lies on one side of ``threshold`` (more rounds change nothing)."""
        return self.lo >= threshold or self.hi < threshold

    @property
    def ci(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def text(self) -> str:
        """``x1.06 [0.97-1.16]`` (an en dash): the ratio with its interval, for reasons, tables."""
        return f"x{self.estimate:.2f} {interval_text(self.lo, self.hi)}"


def interval_text(lo: float, hi: float) -> str:
    """``[0.97-1.16]`` with an en dash, as in the report's ``speedup [lo-hi]`` column."""
    return f"[{_num(lo)}{DASH}{_num(hi)}]"


def paired_speedup(
    new_ms: Sequence[float], old_ms: Sequence[float], confidence: float = CONFIDENCE
) -> Speedup:
    """Speedup of ``new`` over ``old`` from their per-round medians, paired by round.

    Args:
        new_ms: ``new``'s median latency in each round.
        old_ms: ``old``'s median latency in the same rounds (same length, same order).
        confidence: Two-sided confidence of the interval.

    Returns:
        The geometric mean of ``old/new`` over rounds and its t-interval. With fewer than two
        rounds the interval is (0, inf): nothing can be decided from one round.
    """
    if len(new_ms) != len(old_ms):
        raise ValueError(
            f"paired rounds differ in length ({len(new_ms)} vs {len(old_ms)}): both models must "
            "be timed in the same interleaved rounds"
        )
    pairs = [(n, o) for n, o in zip(new_ms, old_ms, strict=True) if n > 0 and o > 0]
    if not pairs:
        return Speedup(float("nan"), 0.0, math.inf, 0, confidence)
    logs = [math.log(o / n) for n, o in pairs]
    k = len(logs)
    mean = sum(logs) / k
    if k < 2:
        return Speedup(math.exp(mean), 0.0, math.inf, k, confidence)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (k - 1))
    half = _t_quantile(0.5 + confidence / 2, k - 1) * sd / math.sqrt(k)
    return Speedup(math.exp(mean), math.exp(mean - half), math.exp(mean + half), k, confidence)


def sequential_confidence(rounds: int, planned: int, confidence: float = CONFIDENCE) -> float:
    """The confidence to judge with after ``rounds`` rounds of a benchmark that may add rounds.

    A benchmark that adds a round and looks again until the interval excludes the threshold gets
    many chances to be wrong: stopping at the first "decided" look makes noise look like a win
    (measured: 2 of 7 A/A nightly runs registered a version, each stopping early, at 14 and 27
    rounds). So the error budget ``1 - confidence`` is spent across looks: half on the first look
    (the ``planned`` rounds), and ``half / ((k - 1) k)`` on look ``k >= 2`` (these sum to the other
    half over any number of looks). Any verdict reached this way is wrong with probability at most
    ``1 - confidence`` however many rounds were added (a union bound over looks).
    """
    alpha = 1.0 - confidence
    look = max(1, rounds - planned + 1)
    spent = alpha / 2 if look == 1 else alpha / 2 / ((look - 1) * look)
    return 1.0 - spent


def quantile_interval(
    buckets: Mapping[float, float], q: float, confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """A distribution-free interval for the ``q`` quantile from a cumulative histogram.

    The ranks come from the binomial order-statistic interval (the count of samples below the true
    quantile is Binomial(n, q)); each rank is read off the histogram with ``histogram_quantile``'s
    linear interpolation inside the bucket. This needs only the scraped bucket counts, no repeated
    scrapes. When the upper rank is past the last sample (fewer than ~370 samples for p99 at 95%),
    the upper end is the largest sample's bucket edge, so that end covers less than stated.

    Args:
        buckets: Upper bound (``le``; ``inf`` allowed) -> cumulative count.
        q: The quantile, e.g. 0.99.
        confidence: Two-sided confidence.

    Returns:
        (low, high) in the buckets' unit, or None without samples.
    """
    from scipy.stats import binom

    bounds = sorted(buckets)
    n = buckets[bounds[-1]] if bounds else 0.0
    if n <= 0:
        return None
    count = round(n)
    alpha = 1.0 - confidence
    lo_rank = max(float(binom.ppf(alpha / 2, count, q)), 1.0)
    hi_rank = min(float(binom.ppf(1 - alpha / 2, count, q)) + 1.0, float(count))
    return _at_rank(buckets, bounds, lo_rank), _at_rank(buckets, bounds, hi_rank)


def _at_rank(buckets: Mapping[float, float], bounds: list[float], rank: float) -> float:
    lower, below = 0.0, 0.0
    finite = [b for b in bounds if not math.isinf(b)]
    for upper in bounds:
        cumulative = buckets[upper]
        if cumulative >= rank:
            if math.isinf(upper):
                return finite[-1] if finite else math.inf
            if cumulative == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return bounds[-1]


@functools.lru_cache(maxsize=1024)
def _t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"
