"""A closed-loop HTTP load generator (aiohttp): C workers, each sends its next request as soon as
the previous one answered, for a fixed time. Reports QPS, p50/p99 and errors."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import aiohttp
import numpy as np


@dataclass
class Result:
    qps: float
    p50_ms: float
    p99_ms: float
    ok: int
    errors: int
    mean_ms: float = float("nan")


async def _drive(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, headers: dict[str, str]
) -> Result:
    latencies: list[float] = []
    errors = 0
    cycle = itertools.cycle(bodies)
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as s:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            for _ in range(1_000_000):  # bounded; the deadline ends it
                if time.perf_counter() >= deadline:
                    return
                body = next(cycle)
                start = time.perf_counter()
                try:
                    async with s.post(url, data=body) as r:
                        await r.read()
                        good = r.status == 200
                except aiohttp.ClientError:
                    good = False
                if good:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return Result(
        qps=len(latencies) / elapsed,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        ok=len(latencies),
        errors=errors,
        mean_ms=float(np.mean(lat)),
    )


def drive(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> Result:
    """Closed loop against ``url`` (POST, bodies cycled) for ``seconds``."""
    hdrs = {"content-type": "application/json", **(headers or {})}
    return asyncio.run(_drive(url, bodies, concurrency, seconds, hdrs))


async def _get_loop(url: str, concurrency: int, seconds: float) -> float:
    count = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                async with s.get(url) as r:
                    await r.read()
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - start)


def ceiling(url: str, concurrency: int = 32, seconds: float = 2.0) -> float:
    """Requests/s this client reaches against a trivial GET endpoint."""
    return asyncio.run(_get_loop(url, concurrency, seconds))
