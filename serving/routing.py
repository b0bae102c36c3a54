"""Traffic split: which role (champion or canary) answers a request, and shadow comparison."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping

import numpy as np

CHAMPION = "champion"
CANARY = "canary"
SHADOW = "shadow"


def choose_role(weight: int, routing_key: str | None, rng: random.Random | None = None) -> str:
    """``canary`` for ``weight``% of requests, else ``champion``.

    With a routing key (e.g. a user id from ``X-Routing-Key``) the choice is sticky: the same key
    always lands in the same bucket of 100, so raising the weight only moves keys champion ->
    canary, never back.
    """
    if weight <= 0:
        return CHAMPION
    if weight >= 100:
        return CANARY
    if routing_key is not None:
        digest = hashlib.blake2b(routing_key.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest, "big") % 100
    else:
        bucket = int((rng or random).random() * 100)
    return CANARY if bucket < weight else CHAMPION


def compare(
    champion: Mapping[str, np.ndarray],
    shadow: Mapping[str, np.ndarray],
    atol: float,
    rtol: float,
) -> tuple[bool, float]:
    """Whether the shadow's outputs agree with the champion's, and their largest abs difference.

    Outputs of different shapes or names never agree (max diff is then ``inf``).
    """
    if set(champion) != set(shadow):
        return False, float("inf")
    worst = 0.0
    agree = True
    for name, ref in champion.items():
        other = shadow[name]
        if not isinstance(ref, np.ndarray) or not isinstance(other, np.ndarray):
            return False, float("inf")  # not tensors (a sequence of maps): not comparable
        if ref.shape != other.shape:
            return False, float("inf")
        if ref.size == 0:
            continue
        if ref.dtype.kind in "OSU" or other.dtype.kind in "OSU":  # labels: equal or not
            same = bool(np.array_equal(ref, other))
            worst = worst if same else float("inf")
            agree = agree and same
            continue
        a = ref.astype(np.float64, copy=False)
        b = other.astype(np.float64, copy=False)
        worst = max(worst, float(np.max(np.abs(a - b))))
        agree = agree and bool(np.allclose(b, a, atol=atol, rtol=rtol))
    return agree, worst
