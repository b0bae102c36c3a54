"""An open-loop HTTP load generator: arrivals on a schedule, latency from the scheduled time.

A closed-loop client (C workers, each waiting for its answer) slows down with the server, so a
stalled server hides its queueing ("coordinated omission"). Here request *i* is due at
``t0 + a_i`` (Poisson arrivals at the step's rate, seeded) and is sent at that time whatever is
still outstanding; its latency is ``answer time - due time``. If this client itself falls behind
(its event loop busy), the lag counts as latency too and is reported as ``send_lag_p99_ms``, so a
client bottleneck shows instead of passing as a fast server.

The HTTP client is a minimal HTTP/1.1 keep-alive client over asyncio streams (POST, a
``Content-Length`` answer): a few microseconds per request, no dependency. Connections are pooled;
a request that finds none idle opens a new one, so concurrency is never capped by the client.
A closed-loop mode (:func:`closed_loop`) exists for the capacity probe and the cross-check with
``wrk``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_CRLF2 = b"\r\n\r\n"


@dataclass(frozen=True)
class Target:
    """Where the requests go: ``POST http://host:port/path``."""

    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...] = ()

    def request(self, body: bytes) -> bytes:
        head = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class StepResult:
    """One open-loop step at ``rate`` requests/s."""

    rate: float
    seconds: float  # the schedule's length
    sent: int
    ok: int
    errors: int
    latencies_ms: np.ndarray = field(repr=False)  # successful requests, from their due time
    send_lag_ms: np.ndarray = field(repr=False)  # actual send time - due time
    elapsed: float = 0.0  # first due time to last answer

    @property
    def qps(self) -> float:
        """Answered (200) requests per second over the schedule."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else math.nan

    @property
    def send_lag_p99_ms(self) -> float:
        return float(np.percentile(self.send_lag_ms, 99)) if len(self.send_lag_ms) else math.nan


class _Pool:
    """Keep-alive connections to one target; a request takes an idle one or opens another."""

    def __init__(self, target: Target, timeout_s: float):
        self.target = target
        self.timeout_s = timeout_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def post(self, payload: bytes) -> int:
        """Send one prepared request; return the HTTP status (0 on a connection error)."""
        conn = self.idle.pop() if self.idle else None
        try:
            if conn is None:
                conn = await asyncio.open_connection(self.target.host, self.target.port)
                self.opened.append(conn[1])
            reader, writer = conn
            writer.write(payload)
            status, keep = await asyncio.wait_for(_read_answer(reader), self.timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            if conn is not None:
                conn[1].close()
            return 0
        if keep:
            self.idle.append(conn)
        else:
            writer.close()
        return status

    async def close(self) -> None:
        for writer in self.opened:
            writer.close()
        self.idle.clear()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(_CRLF2)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, keep = 0, True
    for line in lines[1:]:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "content-length":
            length = int(value)
        elif key == "connection" and value.strip().lower() == "close":
            keep = False
    if length:
        await reader.readexactly(length)
    return status, keep


def arrivals(rate: float, seconds: float, seed: int = 0, poisson: bool = True) -> np.ndarray:
    """Due times (s from the step's start) of a ``rate``/s schedule lasting ``seconds``."""
    n = max(1, round(rate * seconds))
    if not poisson:
        return np.arange(n) / rate
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    times = np.cumsum(gaps) - gaps[0]
    return times[times < seconds] if times[-1] >= seconds else times


async def _open_loop(
    target: Target, bodies: Sequence[bytes], due: np.ndarray, timeout_s: float
) -> StepResult:
    pool = _Pool(target, timeout_s)
    payloads = [target.request(b) for b in bodies]
    n = len(due)
    lat = np.full(n, np.nan)
    lag = np.zeros(n)
    status = np.zeros(n, dtype=np.int32)
    loop = asyncio.get_running_loop()

    async def one(i: int, t_due: float) -> None:
        lag[i] = loop.time() - t_due
        status[i] = await pool.post(payloads[i % len(payloads)])
        lat[i] = loop.time() - t_due

    tasks = []
    start = loop.time() + 0.05
    for i, offset in enumerate(due):
        t_due = start + float(offset)
        delay = t_due - loop.time()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, t_due)))
    await asyncio.gather(*tasks)
    elapsed = max(loop.time() - start, 1e-9)
    await pool.close()
    good = status == 200
    return StepResult(
        rate=0.0,  # set by the caller: the schedule's nominal rate
        seconds=float(due[-1]) if n else 0.0,
        sent=n,
        ok=int(good.sum()),
        errors=int(n - good.sum()),
        latencies_ms=lat[good] * 1000.0,
        send_lag_ms=lag * 1000.0,
        elapsed=elapsed,
    )


def open_loop(
    target: Target,
    bodies: Sequence[bytes],
    rate: float,
    seconds: float,
    *,
    seed: int = 0,
    poisson: bool = True,
    timeout_s: float = 10.0,
) -> StepResult:
    """Send ``rate`` requests/s (Poisson arrivals) for ``seconds``; wait for every answer."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    due = arrivals(rate, seconds, seed, poisson)
    result = asyncio.run(_open_loop(target, bodies, due, timeout_s))
    result.rate = rate  # the schedule's nominal rate (the realized count is `sent`)
    return result


@dataclass
class ClosedResult:
    """A closed-loop run: ``concurrency`` workers back to back for ``seconds``."""

    qps: float
    p50_ms: float
    p99_ms: float
    ok: int
    errors: int


async def _closed_loop(
    target: Target, bodies: Sequence[bytes], concurrency: int, seconds: float, timeout_s: float
) -> ClosedResult:
    payloads = [target.request(b) for b in bodies]
    pools = [_Pool(target, timeout_s) for _ in range(concurrency)]  # one connection per worker
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status = await pools[k].post(payloads[i % len(payloads)])
            i += concurrency
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - began
    for p in pools:
        await p.close()
    lat = np.asarray(latencies) * 1000.0 if latencies else np.asarray([math.nan])
    return ClosedResult(
        qps=len(latencies) / elapsed,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        ok=len(latencies),
        errors=errors,
    )


def closed_loop(
    target: Target,
    bodies: Sequence[bytes],
    concurrency: int,
    seconds: float,
    timeout_s: float = 10.0,
) -> ClosedResult:
    """``concurrency`` workers, each sending its next request when the previous one answered."""
    return asyncio.run(_closed_loop(target, bodies, concurrency, seconds, timeout_s))
