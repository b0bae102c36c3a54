"""The dynamic batcher alone, with a fake predict function: how batches are formed and ordered.

No model and no server: the predict function records what it was given, so each test counts
batches instead of timing a model.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bladeflow.serving import heap
from bladeflow.serving.batching import Batcher, ModelQueue
from bladeflow.serving.codec import InputMeta

# A float input with a dynamic second axis: not paddable, so each width is its own group.
X = {"x": InputMeta("x", "float32", ("batch", "width"))}
Y_SHAPE = {"y": ("batch", 1)}


class Recorder:
    """A predict function that records each batch's shape and start time, optionally gated."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None):
        self.batches: list[tuple[int, ...]] = []
        self.starts: list[float] = []
        self.delay_s = delay_s
        self.gate = gate

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.starts.append(time.monotonic())
        self.batches.append(feeds["x"].shape)
        if self.gate is not None and len(self.batches) == 1:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        return {"y": feeds["x"].sum(axis=1, keepdims=True)}


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


def make_batcher(
    predict: Recorder, executor: ThreadPoolExecutor, **kw: Any
) -> tuple[Batcher, list[float]]:
    waits: list[float] = []
    options: dict[str, Any] = {"max_batch_size": 4, "timeout_s": 0.0, "workers": 1, **kw}
    batcher = Batcher(
        predict,
        X,
        Y_SHAPE,
        ModelQueue(10_000),
        executor=executor,
        on_queue_wait=waits.append,
        **options,
    )
    return batcher, waits


def row(width: int, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"x": np.full((1, width), value, np.float32)}


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def test_a_constantly_refilled_group_does_not_starve_another(executor: ThreadPoolExecutor) -> None:
    # setup: group A (width 3) is refilled twice as fast as it is served; one B (width 5)
    # request waits behind 8 A requests. "Fullest group first" would never serve B.
    predict = Recorder(delay_s=0.002)

    async def scenario() -> list[tuple[int, ...]]:
        batcher, _ = make_batcher(predict, executor)
        refilling = True

        def refill(done: asyncio.Future) -> None:
            if refilling:
                for _ in range(2):
                    batcher.submit(row(3), bounded=False).add_done_callback(refill)

        for _ in range(8):
            batcher.submit(row(3), bounded=False).add_done_callback(refill)
        b = batcher.submit(row(5, 2.0), bounded=False)
        # execute
        out = await asyncio.wait_for(b, 10)  # starvation fails here instead of hanging
        await asyncio.sleep(0.05)  # A keeps flowing
        refilling = False
        await batcher.close()
        assert out["y"].tolist() == [[10.0]]
        return list(predict.batches)

    batches = run(scenario)
    # assert: B ran right after the two A batches that were ahead of it, though A kept growing
    assert batches[:3] == [(4, 3), (4, 3), (1, 5)]
    assert len(batches) > 4 and all(width == 3 for _, width in batches[3:])


def test_batches_hold_one_group_each_and_fill_up(executor: ThreadPoolExecutor) -> None:
    # setup: interleaved requests of two shapes, all queued before the batcher runs
    predict = Recorder()

    async def scenario() -> list[dict[str, np.ndarray]]:
        batcher, _ = make_batcher(predict, executor)
        futures = [
            batcher.submit(row(3 if i % 2 == 0 else 4, float(i)), bounded=False) for i in range(8)
        ]
        # execute
        outs = await asyncio.wait_for(asyncio.gather(*futures), 10)
        await batcher.close()
        return list(outs)

    outs = run(scenario)
    # assert: two full batches (one per shape), not four half batches of mixed arrivals
    assert predict.batches == [(4, 3), (4, 4)]
    assert [o["y"][0, 0] for o in outs] == [i * (3 if i % 2 == 0 else 4) for i in range(8)]


def test_a_request_that_waited_through_a_batch_does_not_wait_the_timeout_again(
    executor: ThreadPoolExecutor,
) -> None:
    # setup: a full batch runs (held by a gate); a second request arrives meanwhile and
    # waits longer than the batch timeout before the worker frees up
    gate = threading.Event()
    predict = Recorder(gate=gate)
    timeout = 1.0

    async def scenario() -> float:
        batcher, waits = make_batcher(predict, executor, max_batch_size=2, timeout_s=timeout)
        first = batcher.submit({"x": np.ones((2, 3), np.float32)}, bounded=False)  # full: goes
        await asyncio.sleep(0.05)
        second = batcher.submit(row(3), bounded=False)
        await asyncio.sleep(timeout + 0.1)
        # execute
        released = time.monotonic()
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        await batcher.close()
        assert len(waits) == 2 and waits[1] >= timeout
        return predict.starts[1] - released

    started_after_release = run(scenario)
    # assert: it left as soon as the worker was free, not a further timeout later
    assert started_after_release < timeout / 2


def test_a_full_batch_leaves_without_waiting_for_the_timeout(executor: ThreadPoolExecutor) -> None:
    # setup
    predict = Recorder()

    async def scenario() -> float:
        batcher, _ = make_batcher(predict, executor, timeout_s=30.0)
        start = time.monotonic()
        # execute
        await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(row(3), bounded=False) for _ in range(4))), 10
        )
        elapsed = time.monotonic() - start
        await batcher.close()
        return elapsed

    elapsed = run(scenario)
    # assert
    assert elapsed < 5 and predict.batches == [(4, 3)]


def test_queue_wait_is_reported_for_every_request(executor: ThreadPoolExecutor) -> None:
    # setup: a batch that never fills waits the whole timeout for its oldest request
    predict = Recorder()

    async def scenario() -> list[float]:
        batcher, waits = make_batcher(predict, executor, timeout_s=0.05)
        futures = [batcher.submit(row(3), bounded=False) for _ in range(3)]
        # execute
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        await batcher.close()
        return waits

    waits = run(scenario)
    # assert
    assert len(waits) == 3 and min(waits) >= 0.04 and predict.batches == [(3, 3)]


def test_one_failing_request_does_not_fail_its_batch_neighbours(
    executor: ThreadPoolExecutor,
) -> None:
    # setup: the predict function refuses any batch holding a NaN
    def predict(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if np.isnan(feeds["x"]).any():
            raise ValueError("NaN in the input")
        return {"y": feeds["x"].sum(axis=1, keepdims=True)}

    async def scenario() -> list[Any]:
        batcher = Batcher(
            predict,
            X,
            Y_SHAPE,
            ModelQueue(100),
            max_batch_size=4,
            timeout_s=0.0,
            workers=1,
            executor=executor,
        )
        futures = [batcher.submit(row(3, v), bounded=False) for v in (1.0, float("nan"), 2.0)]
        # execute
        outs = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return list(outs)

    good, bad, other = run(scenario)
    # assert
    assert isinstance(bad, ValueError)
    assert good["y"].tolist() == [[3.0]] and other["y"].tolist() == [[6.0]]


def test_the_heap_is_frozen_again_when_the_served_versions_change() -> None:
    # setup: a stand-in fleet whose one slot swaps its deployment
    slot = SimpleNamespace(deployment=SimpleNamespace(runners=lambda: {"champion": object()}))
    fleet: Any = SimpleNamespace(slots={"m": slot})

    async def scenario() -> tuple[int, int]:
        keeper = asyncio.get_running_loop().create_task(heap.keep_frozen(fleet, 0.01))
        await asyncio.sleep(0.05)
        before = gc.get_freeze_count()
        garbage_we_keep = [[i] for i in range(1000)]  # long-lived objects a load would add
        runner = object()
        slot.deployment = SimpleNamespace(runners=lambda: {"champion": runner})
        # execute
        await asyncio.sleep(0.1)
        after = gc.get_freeze_count()
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        del garbage_we_keep
        return before, after

    try:
        before, after = run(scenario)
    finally:
        gc.unfreeze()  # give this test process its collector back
    # assert
    assert after >= before + 1000
