"""bench/wrk_check.py reads wrk's raw latencies back from its corrected histogram."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.wrk_check import raw_percentile_us, run_wrk, uncorrect


def wrk_correct(raw: dict[int, int], interval: int) -> dict[int, int]:
    """wrk 4.1's stats_correct (src/stats.c), transcribed: the forward direction."""
    data = dict(raw)
    top = max(raw)
    for n in range(interval * 2, top + 1):
        count = raw.get(n, 0)  # reads are of buckets no smaller index has written to
        m = n - interval
        while count and m > interval:
            data[m] = data.get(m, 0) + count
            m -= interval
    return data


@pytest.mark.parametrize("seed", range(5))
def test_uncorrect_recovers_the_raw_histogram(seed: int) -> None:
    # setup: latencies in us, mostly near 1 ms with a long tail, as a histogram
    rng = np.random.default_rng(seed)
    samples = np.concatenate([rng.normal(1000, 100, 3000), rng.uniform(2000, 60000, 60)])
    values, counts = np.unique(np.maximum(samples, 1).astype(int), return_counts=True)
    raw = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
    interval = int(samples.mean())
    corrected = wrk_correct(raw, interval)

    # execute
    recovered = uncorrect(corrected, interval)

    # assert: exact inversion, and the corrected histogram's median is not the raw one's
    assert recovered == raw
    n = int(counts.sum())
    assert raw_percentile_us(recovered, n, 50) == pytest.approx(np.median(samples), abs=5)
    assert raw_percentile_us(corrected, sum(corrected.values()), 50) > np.median(samples) + 20


class DelayServer:
    """HTTP/1.1 keep-alive on loopback; request i waits delays_ms[i % len(delays_ms)]."""

    def __init__(self, delays_ms: list[float]):
        self.delays_ms = delays_ms
        self.answered = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    key, _, value = line.partition(":")
                    if key.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                delay = self.delays_ms[self.answered % len(self.delays_ms)]
                await asyncio.sleep(delay / 1000.0)
                self.answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> DelayServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def cancel_handlers() -> None:
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(cancel_handlers(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def wrk() -> Iterator[None]:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    yield


@pytest.mark.parametrize(
    ("delays_ms", "low", "high", "histogram"),
    [
        # raw median (~3 ms) below wrk's interval (~15 ms): read from the raw buckets; the
        # stalls' synthetic samples raise the printed median towards the top of the 1-5 ms group
        ([1, 2, 3, 4, 5] * 5 + [300], 2.5, 5.0, "prefix"),
        # raw median (~20 ms) above the interval (~17 ms): the hook writes every bucket
        ([1] * 12 + [20] * 27 + [120], 19.0, 24.0, "full"),
    ],
)
def test_run_wrk_reports_the_raw_median(
    wrk: None,
    tmp_path: Path,
    delays_ms: list[float],
    low: float,
    high: float,
    histogram: str,
) -> None:
    # setup
    with DelayServer(delays_ms) as server:
        # execute: one connection, so the delays arrive in order
        r = run_wrk(f"http://127.0.0.1:{server.port}/x", b"{}", 1, 3.0, tmp_path)
        answered = server.answered

    # assert
    assert low <= r["p50_ms"] <= high, r
    assert 0 <= answered - r["ok"] <= 1  # at most the request in flight at the deadline
    assert r["errors"] == 0
    assert r["histogram"] == histogram
    if histogram == "prefix":
        assert r["p50_printed_ms"] > r["p50_ms"] + 1.0, r  # ~5.2 vs ~3.2 ms on a quiet run
