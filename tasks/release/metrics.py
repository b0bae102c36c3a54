"""Serving metrics as the release gates see them: parse, subtract two scrapes, summarize.

Counters are cumulative, so a stage is judged on the difference between a scrape at its start and
the latest one, summed over replicas. A replica whose counters went down was restarted: its
current values are the whole delta (what Prometheus' ``rate`` does). The metric names are the
interface with ``serving/metrics.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

REQUESTS = "bladeflow_requests_total"
DURATION = "bladeflow_request_duration_seconds"
SHADOW = "bladeflow_shadow_comparisons_total"
INFO = "bladeflow_model_info"
_WANTED = {REQUESTS, DURATION + "_bucket", DURATION + "_count", DURATION + "_sum", SHADOW, INFO}

# Sample key: (sample name, sorted label pairs). One endpoint's samples for one model.
Key = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[Key, float]


def parse(text: str, model: str) -> Samples:
    """The samples of the release metrics for ``model`` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in _WANTED or s.labels.get("model") != model:
                continue
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model"))
            out[(s.name, labels)] = float(s.value)
    return out


def delta(base: Samples | None, current: Samples) -> Samples:
    """Counter increase from ``base`` to ``current`` for one endpoint (restart-aware).

    ``base`` is None when the endpoint could not be scraped at the start: nothing is known about
    its earlier counts, so it contributes nothing until it has a baseline of its own.
    """
    if base is None:
        return {}
    restarted = any(current.get(k, 0.0) < v for k, v in base.items() if not k[0].startswith(INFO))
    out: Samples = {}
    for key, value in current.items():
        if key[0] == INFO:
            out[key] = value  # a gauge: the current value
        else:
            out[key] = value if restarted else value - base.get(key, 0.0)
    return out


def total(deltas: Iterable[Samples]) -> Samples:
    """Sum per-endpoint deltas (replicas) into one set of samples."""
    out: Samples = {}
    for d in deltas:
        for key, value in d.items():
            out[key] = out.get(key, 0.0) + value
    return out


@dataclass
class RoleStats:
    """Requests, 5xx errors and latency buckets of one version in given roles, over a window."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    rejected: float = 0.0  # 4xx other than 429 (queue full): inputs this version refused
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def rejected_rate(self) -> float:
        return self.rejected / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """Like PromQL ``histogram_quantile``: linear within the bucket; None without data."""
        if not self.buckets:
            return None
        bounds = sorted(self.buckets)
        count = self.buckets[bounds[-1]]
        if count <= 0:
            return None
        rank = q * count
        lower, below = 0.0, 0.0
        for upper in bounds:
            cumulative = self.buckets[upper]
            if cumulative >= rank:
                if math.isinf(upper):
                    finite = [b for b in bounds if not math.isinf(b)]
                    return finite[-1] if finite else None
                if cumulative == below:
                    return upper
                return lower + (upper - lower) * (rank - below) / (cumulative - below)
            lower, below = upper, cumulative
        return bounds[-1]


def role_stats(samples: Mapping[Key, float], version: str, roles: set[str]) -> RoleStats:
    """Summed stats of ``version`` answering in any of ``roles``."""
    stats = RoleStats()
    for (name, labels), value in samples.items():
        lab = dict(labels)
        if lab.get("version") != version or lab.get("role") not in roles:
            continue
        if name == REQUESTS:
            stats.requests += value
            status = lab.get("status", "")
            if status.startswith("5"):
                stats.errors += value
            elif status.startswith("4") and status != "429":
                stats.rejected += value
        elif name == DURATION + "_bucket":
            le = float(lab["le"])
            stats.buckets[le] = stats.buckets.get(le, 0.0) + value
    return stats


def agreement(samples: Mapping[Key, float], version: str) -> tuple[float, float]:
    """(agreeing, total) shadow comparisons of ``version``."""
    agree = total_ = 0.0
    for (name, labels), value in samples.items():
        lab = dict(labels)
        if name == SHADOW and lab.get("version") == version:
            total_ += value
            if lab.get("agree") == "true":
                agree += value
    return agree, total_


def loaded(samples: Mapping[Key, float]) -> set[tuple[str, str]]:
    """(version, role) pairs that ``bladeflow_model_info`` reports as loaded."""
    out = set()
    for (name, labels), value in samples.items():
        if name == INFO and value >= 1:
            lab = dict(labels)
            out.add((lab.get("version", ""), lab.get("role", "")))
    return out
