"""Shadow traffic: a share of champion requests also runs on the canary; outputs are compared.

The caller never waits for, or sees, the shadow run: it is counted (role ``shadow``) and its
agreement with the champion lands in ``bladeflow_shadow_comparisons_total`` and
``bladeflow_shadow_max_abs_diff``.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bladeflow.serving.batching import Outputs, QueueFull
from bladeflow.serving.codec import InferRequest
from bladeflow.serving.fleet import ModelSlot, Runner
from bladeflow.serving.metrics import Metrics
from bladeflow.serving.model import ServeOptions
from bladeflow.serving.routing import CHAMPION, SHADOW, compare


def shadow_share(slot: ModelSlot, options: ServeOptions) -> float:
    """Mirror share (0..1): the --shadow floor, or the release's registry tag when it asks more."""
    wanted = slot.wanted.shadow_share / 100 if slot.wanted else 0.0
    return max(options.shadow_share, wanted)


class Shadow:
    """Mirrors champion requests to the canary in the background and records the comparison."""

    def __init__(self, metrics: Metrics, options: ServeOptions, rng: random.Random):
        self._metrics = metrics
        self._options = options
        self._rng = rng
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until done

    def mirror(self, slot: ModelSlot, role: str, req: InferRequest, reference: Outputs) -> None:
        """Maybe run ``req`` on the canary too; ``reference`` is what the champion answered."""
        canary = slot.deployment.canary
        if role != CHAMPION or canary is None:
            return
        share = shadow_share(slot, self._options)
        if not share or self._rng.random() >= share:
            return
        try:
            future = canary.batcher.submit(req.inputs)
        except (QueueFull, RuntimeError):
            return  # shadow traffic never competes for a full queue (or a retiring canary)
        task = asyncio.get_running_loop().create_task(
            self._compare(slot.name, canary, future, reference)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(
        self, name: str, canary: Runner, future: asyncio.Future[Any], reference: Outputs
    ) -> None:
        m = self._metrics
        start = time.perf_counter()
        try:
            outputs = await asyncio.wait_for(future, self._options.request_timeout_s)
        except Exception:  # noqa: BLE001 - a failing shadow is counted, never seen by the caller
            m.requests.labels(name, canary.version, SHADOW, "500").inc()
            return
        m.requests.labels(name, canary.version, SHADOW, "200").inc()
        m.request_duration.labels(name, canary.version, SHADOW).observe(time.perf_counter() - start)
        o = self._options
        agree, diff = compare(reference, outputs, o.shadow_atol, o.shadow_rtol)
        m.shadow_comparisons.labels(name, canary.version, "true" if agree else "false").inc()
        if diff != float("inf"):
            m.shadow_max_abs_diff.labels(name, canary.version).observe(diff)
