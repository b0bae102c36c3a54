"""Shared pieces of the serving reliability tests: a registry fixture, RSS, and load generators.

The load generators are asyncio + aiohttp in one thread of the test process: on a 2-core machine
they compete with the server for CPU, so they are kept cheap (one event loop, no per-request
threads) and the load levels are sized from a capacity measured on the same machine, same run.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from bladeflow.core.settings import Settings
from tests import models
from tests.serving.conftest import Registry, Server, start_server

TOKEN = "bf-" + secrets.token_hex(16)
_SHARED: dict[str, Server] = {}


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A fresh SQLite MLflow registry for one test module (same recipe as tests/serving)."""
    return _registry(tmp_path_factory.mktemp("rel-serve-home"))


def _registry(home: Path) -> Registry:
    settings = Settings.from_env(home=home, environ={})
    settings.home.mkdir(parents=True, exist_ok=True)
    Path(settings.artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in settings.environment().items() if k != "PREFECT_HOME"}
    return Registry(settings, env)


@pytest.fixture
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """One token-protected server for the fast (default-run) security and bad-input tests.

    Started once per session and shared by test_security.py and test_serving_fuzz.py (a module
    fixture would start one per file: ~15 s each). Serves ``sec`` (an MLP, x [batch, 8] FP32)
    and ``tok`` (token ids + mask, INT64 [batch, sequence]) at --log-level debug.
    """
    srv = _SHARED.get("server")
    if srv is None or srv.proc.poll() is not None:
        d = tmp_path_factory.mktemp("secured")
        r = _registry(d / "home")
        r.register("sec", models.mlp(d / "mlp" / "m.onnx"))
        r.register("tok", models.token_model(d / "tok" / "m.onnx"))
        srv = start_server(
            r, d, ["sec", "tok"], "--log-level", "debug", "--poll-interval", "1", token=TOKEN
        )
        request.config.add_cleanup(_stopper(srv))
        _SHARED["server"] = srv
    return srv


def _stopper(server: Server) -> Callable[[], None]:
    def stop() -> None:
        server.stop()

    return stop


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB, from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``; nan when empty."""
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Result:
    sent: float  # monotonic time the request was sent
    status: int  # HTTP status; 0 for a connection error / client timeout
    latency: float
    version: str = ""  # model_version of a 200, or the error text


@dataclass
class Load:
    """Requests sent to ``url`` (POST ``body``) from a background thread until :meth:`stop`.

    ``rate`` > 0: open loop, one request every 1/rate s whatever the answers (overload);
    otherwise closed loop with ``concurrency`` clients each sending as soon as answered.
    """

    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    rate: float = 0.0
    concurrency: int = 4
    timeout_s: float = 30.0
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Result]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 30)
        return self.results

    def run_for(self, seconds: float) -> list[Result]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def since(self, t: float) -> list[Result]:
        return [r for r in list(self.results) if r.sent >= t]

    async def _one(self, session: aiohttp.ClientSession) -> None:
        sent = time.monotonic()
        try:
            async with session.post(self.url, data=self.body, headers=self.headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.results.append(Result(sent, 0, time.monotonic() - sent, repr(exc)))
            return
        latency = time.monotonic() - sent
        text = raw.decode(errors="replace")
        if status == 200:
            # the version is near the start; avoid parsing the whole output
            marker = '"model_version":"'
            i = text.find(marker)
            version = text[i + len(marker) : text.find('"', i + len(marker))] if i >= 0 else "?"
        else:
            version = text[:200]
        self.results.append(Result(sent, status, latency, version))

    async def _main(self) -> None:
        headers = {"content-type": "application/json", **self.headers}
        self.headers = headers
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            if self.rate > 0:
                await self._open(session)
            else:
                await self._closed(session)

    async def _closed(self, session: aiohttp.ClientSession) -> None:
        async def client() -> None:
            while not self._stop.is_set():
                await self._one(session)

        await asyncio.gather(*(client() for _ in range(self.concurrency)))

    async def _open(self, session: aiohttp.ClientSession) -> None:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        i = 0
        while not self._stop.is_set():
            due = start + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)


def wait_for(predicate: Callable[[], Any], timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
