"""Dynamic batching: merge queued requests along the batch axis, run once, split the outputs.

``merge`` and ``split`` are pure functions; :class:`Batcher` is the asyncio loop that forms batches
(up to ``max_batch_size`` rows, waiting at most ``timeout_s`` after the first request) and runs
them on a thread pool, at most ``workers`` batches at a time per model version.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from bladeflow.serving.codec import InputMeta

log = logging.getLogger("bladeflow.serving")

Outputs = dict[str, np.ndarray]
Predict = Callable[[dict[str, np.ndarray]], Outputs]


class QueueFull(Exception):
    """The model's queue holds ``max_queue_size`` requests already (HTTP 429)."""


@dataclass
class Span:
    """Where one request sits in a merged batch: its rows, and its length on padded axes."""

    start: int
    stop: int
    lengths: dict[str, int] = field(default_factory=dict)  # dim symbol -> original length


def paddable(meta: InputMeta) -> bool:
    """Integer inputs with a dynamic non-batch axis (token ids, masks) are padded with zeros."""
    return meta.dtype.startswith(("int", "uint", "bool")) and any(
        not isinstance(d, int) for d in meta.shape[1:]
    )


def group_key(inputs: Mapping[str, np.ndarray], metas: Mapping[str, InputMeta]) -> tuple:
    """Requests with equal keys can share one batch."""
    return tuple(
        (name, arr.ndim if paddable(metas[name]) else arr.shape[1:])
        for name, arr in sorted(inputs.items())
    )


def merge(
    requests: Sequence[Mapping[str, np.ndarray]], metas: Mapping[str, InputMeta]
) -> tuple[dict[str, np.ndarray], list[Span]]:
    """Concatenate requests along axis 0; pad token inputs only to the longest in the batch.

    Padding uses 0, which is also the attention mask's value for "ignore this position".
    """
    spans: list[Span] = []
    row = 0
    for req in requests:
        n = int(next(iter(req.values())).shape[0])
        spans.append(Span(row, row + n))
        row += n
    if len(requests) == 1:
        return dict(requests[0]), spans
    feeds: dict[str, np.ndarray] = {}
    for name in requests[0]:
        arrays = [req[name] for req in requests]
        meta = metas[name]
        if paddable(meta):
            target = np.max([a.shape for a in arrays], axis=0)
            for span, arr in zip(spans, arrays, strict=True):
                for axis in range(1, arr.ndim):
                    symbol = meta.shape[axis]
                    if isinstance(symbol, str):
                        span.lengths[symbol] = int(arr.shape[axis])
            arrays = [
                a
                if tuple(a.shape[1:]) == tuple(target[1:])
                else np.pad(
                    a,
                    [(0, 0)]
                    + [(0, int(t - s)) for s, t in zip(a.shape[1:], target[1:], strict=True)],
                )
                for a in arrays
            ]
        feeds[name] = np.concatenate(arrays, axis=0)
    return feeds, spans


def split(
    outputs: Mapping[str, np.ndarray],
    spans: Sequence[Span],
    output_shapes: Mapping[str, Sequence[int | str | None]],
) -> list[Outputs]:
    """Cut merged outputs back into one dict per request, trimming padded sequence axes."""
    if len(spans) == 1 and not spans[0].lengths:
        return [dict(outputs)]
    results: list[Outputs] = []
    for span in spans:
        one: Outputs = {}
        for name, arr in outputs.items():
            part = arr[span.start : span.stop]
            symbols = output_shapes.get(name, ())
            for axis in range(1, min(len(symbols), part.ndim)):
                symbol = symbols[axis]
                length = span.lengths.get(symbol) if isinstance(symbol, str) else None
                if length is not None and part.shape[axis] != length:
                    index = [slice(None)] * part.ndim
                    index[axis] = slice(0, length)
                    part = part[tuple(index)]
            one[name] = part
        results.append(one)
    return results


def _pad_to(arr: np.ndarray, target: np.ndarray) -> np.ndarray:
    widths = [(0, int(t) - int(s)) for s, t in zip(arr.shape, target, strict=True)]
    widths[0] = (0, 0)
    return arr if not any(w for _, w in widths) else np.pad(arr, widths)


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[Outputs]


class ModelQueue:
    """The bounded count of requests waiting for one model (all its versions together)."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        self.limit = limit
        self.depth = 0
        self._on_change = on_change

    def add(self, n: int) -> None:
        self.depth += n
        if self._on_change:
            self._on_change(self.depth)


class Batcher:
    """Forms batches for one model version and runs them on ``executor``.

    Args:
        predict: Runs one merged batch (called in a worker thread).
        metas: The model inputs, for merging.
        output_shapes: Output shapes with dim symbols, for trimming padded axes.
        queue: The model's bounded queue counter.
        max_batch_size: Rows per batch at most (1 disables batching).
        timeout_s: How long the first request of a batch waits for more.
        workers: Batches of this version that run at the same time.
        executor: Thread pool the batches run on.
        on_batch: Called with (rows, seconds) after each batch ran.
    """

    def __init__(
        self,
        predict: Predict,
        metas: Mapping[str, InputMeta],
        output_shapes: Mapping[str, Sequence[int | str | None]],
        queue: ModelQueue,
        *,
        max_batch_size: int,
        timeout_s: float,
        workers: int,
        executor: Executor,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self._predict = predict
        self._metas = metas
        self._output_shapes = output_shapes
        self._queue = queue
        self._max = max(1, max_batch_size)
        self._timeout = max(0.0, timeout_s)
        self._slots = asyncio.Semaphore(max(1, workers))
        self._executor = executor
        self._on_batch = on_batch
        self._items: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._running: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, inputs: dict[str, np.ndarray], *, bounded: bool = True) -> asyncio.Future:
        """Queue one request; its future resolves to that request's outputs.

        Raises:
            QueueFull: ``bounded`` and the model queue is at its limit.
        """
        if self._closing:
            raise RuntimeError("this model version is retired")
        if bounded and self._queue.depth >= self._queue.limit:
            raise QueueFull
        rows = int(next(iter(inputs.values())).shape[0])
        fut: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._items.append(_Item(inputs, rows, fut))
        self._queue.add(1)
        self._wakeup.set()
        return fut

    async def close(self) -> None:
        """Finish every queued and running batch, then stop."""
        self._closing = True
        self._wakeup.set()
        await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            while not self._items:
                if self._closing:
                    self._slots.release()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [self._items.popleft()]
            rows = batch[0].rows
            deadline = loop.time() + self._timeout
            while rows < self._max:
                if self._items:
                    if rows + self._items[0].rows > self._max:
                        break
                    item = self._items.popleft()
                    batch.append(item)
                    rows += item.rows
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closing:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            self._queue.add(-len(batch))
            live = [item for item in batch if not item.future.done()]  # drop timed-out ones
            if not live:
                self._slots.release()
                continue
            task = loop.create_task(self._execute(live))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            groups: dict[tuple, list[_Item]] = {}
            for item in batch:
                groups.setdefault(group_key(item.inputs, self._metas), []).append(item)
            for items in groups.values():
                try:
                    results = await loop.run_in_executor(self._executor, self._run, items)
                except Exception as exc:  # noqa: BLE001 - handed to the requests, not hidden
                    if len(items) > 1:  # one bad request must not fail its batch neighbours
                        for item in items:
                            await self._run_alone(item)
                        continue
                    _fail(items, exc)
                    continue
                for item, out in zip(items, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(out)
        finally:
            self._slots.release()

    async def _run_alone(self, item: _Item) -> None:
        loop = asyncio.get_running_loop()
        try:
            (out,) = await loop.run_in_executor(self._executor, self._run, [item])
        except Exception as exc:  # noqa: BLE001 - handed to the request
            _fail([item], exc)
        else:
            if not item.future.done():
                item.future.set_result(out)

    def _run(self, items: list[_Item]) -> list[Outputs]:
        feeds, spans = merge([item.inputs for item in items], self._metas)
        start = time.perf_counter()
        outputs = self._predict(feeds)
        elapsed = time.perf_counter() - start
        if self._on_batch:
            self._on_batch(spans[-1].stop, elapsed)
        return split(outputs, spans, self._output_shapes)


def _fail(items: list[_Item], exc: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
