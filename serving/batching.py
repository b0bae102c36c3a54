"""Dynamic batching: merge queued requests along the batch axis, run once, split the outputs.

``merge`` and ``split`` are pure functions; :class:`Batcher` is the asyncio loop that forms batches
of one shape group each, oldest request first (up to ``max_batch_size`` rows, waiting at most
``timeout_s`` after the oldest request arrived) and runs them on a thread pool, at most
``workers`` batches at a time per model version.
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
        inner = {a.shape[1:] for a in arrays}
        if len(inner) == 1 or not paddable(meta):
            feeds[name] = np.concatenate(arrays, axis=0)
            continue
        target = tuple(max(dims) for dims in zip(*inner, strict=True))
        for span, arr in zip(spans, arrays, strict=True):
            for axis in range(1, arr.ndim):
                symbol = meta.shape[axis]
                if isinstance(symbol, str):
                    span.lengths[symbol] = int(arr.shape[axis])
        # One zero-filled array, each request copied into its corner: no per-request np.pad.
        merged = np.zeros((row, *target), dtype=arrays[0].dtype)
        for span, arr in zip(spans, arrays, strict=True):
            merged[(slice(span.start, span.stop), *(slice(0, n) for n in arr.shape[1:]))] = arr
        feeds[name] = merged
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


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[Outputs]
    key: tuple  # group_key: items of one key can share a batch
    enqueued: float  # loop.time() at submit


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

    Every batch holds requests of one group (:func:`group_key`) and is led by the oldest waiting
    request: its group's requests join it in arrival order, up to ``max_batch_size`` rows, and
    the others keep their place. So no group can starve another (a batch never picks "the
    fullest group"), and requests of different shapes never fragment one batch into several
    runs. A batch leaves when it is full or when its oldest request has waited ``timeout_s``
    since it arrived (not since a worker became free: a request that waited through the
    previous batch does not wait again).

    Args:
        predict: Runs one merged batch (called in a worker thread).
        metas: The model inputs, for merging.
        output_shapes: Output shapes with dim symbols, for trimming padded axes.
        queue: The model's bounded queue counter.
        max_batch_size: Rows per batch at most (1 disables batching).
        timeout_s: How long the oldest request of a batch waits for more.
        workers: Batches of this version that run at the same time.
        executor: Thread pool the batches run on.
        on_batch: Called with (rows, seconds) after each batch ran.
        on_queue_wait: Called with each request's seconds from submit to its batch leaving.
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
        on_queue_wait: Callable[[float], None] | None = None,
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
        self._on_queue_wait = on_queue_wait
        self._items: collections.deque[_Item] = collections.deque()
        self._rows_by_key: collections.Counter[tuple] = collections.Counter()
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
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outputs] = loop.create_future()
        key = group_key(inputs, self._metas)
        self._items.append(_Item(inputs, rows, fut, key, loop.time()))
        self._rows_by_key[key] += rows
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
            await self._slots.acquire()  # form the batch only once it can run: it grows meanwhile
            while not self._items:
                if self._closing:
                    self._slots.release()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            head = self._items[0]
            deadline = head.enqueued + self._timeout
            while self._rows_by_key[head.key] < self._max and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            batch = self._take(head.key)
            now = loop.time()
            self._queue.add(-len(batch))
            live = [item for item in batch if not item.future.done()]  # drop timed-out ones
            if self._on_queue_wait:
                for item in live:
                    self._on_queue_wait(now - item.enqueued)
            if not live:
                self._slots.release()
                continue
            # Submit here, not from a new task: the worker starts at once, even while the event
            # loop still writes the previous batch's answers.
            running = loop.run_in_executor(self._executor, self._run, live)
            task = loop.create_task(self._finish(live, running))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self, key: tuple) -> list[_Item]:
        """Remove the oldest items of group ``key`` (the head's), up to the row limit.

        The head always goes, even alone over the limit. The group's first request that does not
        fit ends the batch (no overtaking within a group); the rest keep their order.
        """
        batch: list[_Item] = []
        kept: collections.deque[_Item] = collections.deque()
        rows = 0
        while self._items and rows < self._max:
            item = self._items[0]
            if item.key == key:
                if batch and rows + item.rows > self._max:
                    break
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
            self._items.popleft()
        kept.extend(self._items)
        self._items = kept
        self._rows_by_key[key] -= rows
        if self._rows_by_key[key] <= 0:
            del self._rows_by_key[key]
        return batch

    async def _finish(self, items: list[_Item], running: asyncio.Future[list[Outputs]]) -> None:
        released = False
        try:
            try:
                results = await running
            except Exception as exc:  # noqa: BLE001 - handed to the requests, not hidden
                if len(items) > 1:  # one bad request must not fail its batch neighbours
                    for item in items:
                        await self._run_alone(item)
                    return
                _fail(items, exc)
                return
            # Free the worker before handing out the answers: the batcher's wake-up is queued
            # ahead of the handlers', so the next batch is submitted before the event loop
            # spends its time encoding these answers (JSON of every output, per request).
            self._slots.release()
            released = True
            for item, out in zip(items, results, strict=True):
                if not item.future.done():
                    item.future.set_result(out)
        finally:
            if not released:
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
