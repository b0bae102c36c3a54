"""Synthetic per-round medians of two models on a drifting, noisy machine, with a known ratio.

Each round the machine runs at a speed drawn log-uniformly between 1x and 2.5x slower (both
models share it: they are interleaved), each model's round median has its own noise (lognormal,
``sigma``), and with probability ``burst`` one of the two alone is hit by a burst of other load
(x1.3-2.0 on that model only in that round).
"""

from __future__ import annotations

import numpy as np


def rounds(
    rng: np.random.Generator,
    ratio: float,
    n: int = 8,
    sigma: float = 0.04,
    burst: float = 0.1,
    base_ms: float = 10.0,
) -> tuple[list[float], list[float]]:
    """(new, old) per-round medians where old/new latency is ``ratio`` in truth."""
    drift = np.exp(rng.uniform(0.0, np.log(2.5), n))
    new = base_ms / ratio * drift * np.exp(rng.normal(0.0, sigma, n))
    old = base_ms * drift * np.exp(rng.normal(0.0, sigma, n))
    for i in range(n):
        if rng.random() < burst:
            hit = rng.uniform(1.3, 2.0)
            if rng.random() < 0.5:
                new[i] *= hit
            else:
                old[i] *= hit
    return new.tolist(), old.tolist()
