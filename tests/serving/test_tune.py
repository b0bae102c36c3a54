"""bladeflow tune-serving: the open-loop generator's conformance, the search's decisions, the
``bladeflow.serving_config`` tag round trip through a real ``bladeflow serve``, and the search on a
tiny registered model (real MLflow on SQLite, real server processes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core import registry
from bladeflow.tasks.benchmark.openloop import Target, arrivals, closed_loop, open_loop
from bladeflow.tasks.benchmark.serving_search import (
    DEFAULT_CONFIG,
    ConfigResult,
    ServingConfig,
    choose,
    coarse_grid,
    judge,
    neighbours,
)
from bladeflow.tasks.benchmark.serving_server import histogram_quantile
from tests.models import mlp
from tests.serving.conftest import Registry, Server, start_server

# -- a stub HTTP server with a controlled service time (for the generator's conformance) --------


class StubServer:
    """HTTP/1.1 keep-alive server answering 200 after ``delay_s``; serial when ``serial`` (one
    request at a time, so a queue forms); can stall once for ``stall_s`` at the first request."""

    def __init__(self, delay_s: float, serial: bool = False, stall_s: float = 0.0):
        self.delay_s, self.serial, self.stall_s = delay_s, serial, stall_s
        self.port = 0
        self.count = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":")[1])
                await reader.readexactly(length)
                async with self._lock:
                    self.count += 1
                    if self.count == 1 and self.stall_s:
                        await asyncio.sleep(self.stall_s)
                    if self.serial:
                        await asyncio.sleep(self.delay_s)
                if not self.serial:
                    await asyncio.sleep(self.delay_s)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def _run(self) -> None:
        async def main() -> None:
            self._lock = asyncio.Lock() if self.serial or self.stall_s else _NoLock()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            async with server:
                await server.serve_forever()

        self._loop = asyncio.new_event_loop()
        with contextlib.suppress(asyncio.CancelledError):  # __exit__ cancels serve_forever
            self._loop.run_until_complete(main())

    def __enter__(self) -> StubServer:
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop:
            for t in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(t.cancel)

    def target(self) -> Target:
        return Target("127.0.0.1", self.port, "/infer")


class _NoLock:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def test_arrivals_follow_the_rate() -> None:
    # execute
    due = arrivals(200.0, 5.0, seed=1)
    # assert: Poisson count within ~4 sigma of 1000, all inside the step, increasing
    assert abs(len(due) - 1000) < 130
    assert due[0] == 0.0 and due[-1] < 5.0 and np.all(np.diff(due) >= 0)


def test_open_loop_sends_on_schedule_and_measures_service_time() -> None:
    # setup
    with StubServer(delay_s=0.01) as stub:
        # execute
        res = open_loop(stub.target(), [b"{}"], rate=100.0, seconds=1.0, seed=3)
    # assert: every scheduled request went out and answered; latency >= the service time
    assert res.errors == 0 and res.ok == res.sent == stub.count
    assert 60 <= res.sent <= 140
    assert res.percentile(50) >= 10.0  # latency includes the service time (never less)
    assert res.send_lag_p99_ms >= 0.0  # reported; its size depends on the machine's load


def test_open_loop_sees_the_queue_a_closed_loop_hides() -> None:
    """A server that stalls 0.5 s once: the open loop's requests due during the stall all wait
    (latency from their scheduled time), so its p99 shows the stall; a closed loop of one worker
    waits politely and sees a single slow request among hundreds."""
    # setup
    with StubServer(delay_s=0.002, serial=True, stall_s=0.5) as stub:
        # execute
        opened = open_loop(stub.target(), [b"{}"], rate=100.0, seconds=2.0, seed=5)
    with StubServer(delay_s=0.002, serial=True, stall_s=0.5) as stub:
        closed = closed_loop(stub.target(), [b"{}"], concurrency=1, seconds=2.0)
    # assert
    assert opened.percentile(99) > 300.0  # ~50 requests were due during the 0.5 s stall
    assert closed.p50_ms < 250.0  # the closed loop's median never saw the 500 ms stall


def test_closed_loop_rate_matches_service_time() -> None:
    # setup
    with StubServer(delay_s=0.02, serial=True) as stub:
        # execute
        res = closed_loop(stub.target(), [b"{}"], concurrency=2, seconds=1.0)
    # assert: one request at a time, 20 ms each -> at most ~50/s (a loaded machine gives less)
    assert 0 < res.qps <= 55
    assert res.errors == 0


# -- the search's decisions ---------------------------------------------------------------------


def test_judge_decides_with_the_p99_interval() -> None:
    rng = np.random.default_rng(0)
    fast = rng.uniform(1, 10, 2000)
    # execute / assert: clearly under, clearly over, straddling, and errors
    assert judge(fast, 0, slo_ms=20.0) is True
    assert judge(fast + 100, 0, slo_ms=20.0) is False
    assert judge(fast, 1, slo_ms=20.0) is False
    assert judge(fast, 0, slo_ms=9.9) is None  # p99 ~9.9: the interval straddles the SLO


def test_grid_neighbours_and_choice() -> None:
    # setup
    grid = coarse_grid(2)
    best = ServingConfig(max_batch_size=8, workers=2, intra_op_threads=1)
    results = [
        ConfigResult(config=DEFAULT_CONFIG, stage="default", sustained_qps=100.0),
        ConfigResult(config=best, stage="coarse", sustained_qps=200.0),
        ConfigResult(config=grid[1], stage="coarse", sustained_qps=195.0),  # batch 8, 1 worker
    ]
    # execute / assert
    assert {(c.max_batch_size, c.workers, c.intra_op_threads) for c in grid} == {
        (1, 1, 2), (8, 1, 2), (1, 2, 1), (8, 2, 1)
    }  # fmt: skip
    assert {(c.max_batch_size, c.batch_timeout_ms) for c in neighbours(best)} == {
        (4, 2.0), (16, 2.0), (8, 1.0), (8, 5.0)
    }  # fmt: skip
    chosen = choose(results)
    assert chosen is not None and chosen.config.workers == 1  # within 5 %: the simpler one


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.01: 50.0, 0.02: 100.0, float("inf"): 100.0}
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.01)
    assert histogram_quantile(buckets, 0.75) == pytest.approx(0.015)


def test_serving_config_tag_is_parsed_strictly() -> None:
    tag = json.dumps({"max_batch_size": 8, "workers": "2", "sustained_qps": 123.0})
    assert registry.serving_config_from_tag(tag) == {"max_batch_size": 8, "workers": 2}
    assert registry.serving_config_from_tag(None) == {}
    with pytest.raises(ValueError):
        registry.serving_config_from_tag(json.dumps({"workers": 0}))
    with pytest.raises(ValueError):
        registry.serving_config_from_tag("[1, 2]")


# -- the tag round trip through the real server -------------------------------------------------


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


@pytest.mark.slow  # two server start-ups: 91 s on the shared 2 cores
def test_serve_runs_the_tagged_config_and_flags_override(
    reg: Registry, tmp_path: Path, servers: list[Server]
) -> None:
    # setup
    version = reg.register("tuned", mlp(tmp_path / "m.onnx"))
    config = {"max_batch_size": 4, "batch_timeout_ms": 5.0, "workers": 2, "intra_op_threads": 1}
    reg.client().set_model_version_tag(
        "tuned", version, registry.TAG_SERVING_CONFIG, json.dumps({**config, "slo_p99_ms": 50})
    )
    # execute
    servers.append(start_server(reg, tmp_path, ["tuned"]))
    servers.append(start_server(reg, tmp_path, ["tuned"], "--max-batch-size", "16"))
    tagged, flagged = (s.http().get("/v2/models/tuned").json() for s in servers)
    # assert: metadata and the startup line show the tag's config; a flag beats it
    champion = tagged["bladeflow"]["serving_config"]["champion"]
    assert {k: champion[k] for k in config} == config and champion["from"] == "tag"
    log = servers[0].log.read_text()
    assert "max_batch_size=4 batch_timeout_ms=5.0" in log and "(from tag)" in log
    overridden = flagged["bladeflow"]["serving_config"]["champion"]
    assert overridden["max_batch_size"] == 16 and overridden["workers"] == 2


@pytest.mark.slow  # one server start-up: 31 s on the shared 2 cores
def test_serve_version_pins_one_version(
    reg: Registry, tmp_path: Path, servers: list[Server]
) -> None:
    # setup: champion is v2; --version 1 serves v1 and nothing else
    v1 = reg.register("pinned", mlp(tmp_path / "a.onnx", seed=1))
    reg.register("pinned", mlp(tmp_path / "b.onnx", seed=2))
    # execute
    servers.append(start_server(reg, tmp_path, ["pinned"], "--version", v1))
    doc = servers[0].http().get("/v2/models/pinned").json()
    # assert
    assert doc["versions"] == [v1]


@pytest.mark.slow
def test_tune_serving_on_a_tiny_model(reg: Registry, tmp_path: Path) -> None:
    """The whole stage on a tiny MLP: search, capacity against its source, registry records."""
    from bladeflow.tasks.benchmark.serving_tune import CAPACITY_HEADING, record, tune_serving

    # setup
    source = mlp(tmp_path / "src.onnx")
    version = reg.register("tiny-tune", source, alias=None)
    c = reg.client()
    c.set_model_version_tag("tiny-tune", version, registry.TAG_SOURCE, str(source))
    # execute
    t0 = time.monotonic()
    result = tune_serving(
        reg.settings, "tiny-tune", version, slo_p99_ms=500.0, budget_s=150.0,
        target_qps=500.0, workdir=tmp_path / "work",
    )  # fmt: skip
    took = time.monotonic() - t0
    written = record(reg.settings, result, tmp_path / "work" / "report")
    # assert: a winner that held the SLO, both models in the table, the budget kept
    assert result.serving_config is not None and result.tuned_qps > 0
    assert result.tuned_qps >= result.default_qps
    assert {r["model"] for r in result.table} == {"chosen", "source"}
    assert result.capacity.chosen is not None and result.capacity.chosen.qps_per_core > 0
    assert took < 150.0 + 60.0  # a step may run past the deadline, never a whole stage
    tag = c.get_model_version("tiny-tune", version).tags[registry.TAG_SERVING_CONFIG]
    assert registry.serving_config_from_tag(tag)["max_batch_size"] >= 1
    assert CAPACITY_HEADING in (c.get_model_version("tiny-tune", version).description or "")
    assert any(w.endswith("serving_tune") for w in written)


def test_tune_serving_refuses_a_missing_version_before_any_work(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    # execute: a fresh home, no such model
    env = {**os.environ, "BLADEFLOW_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bladeflow.app.cli", "tune-serving", "nosuch", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # assert: exit 2 naming the argument, no Prefect server started for it
    assert proc.returncode == 2, proc.stderr
    assert "version='3': model 'nosuch' has no such version or alias" in proc.stderr
    assert "must_beat" not in proc.stderr
    assert not (tmp_path / "home" / "prefect-local").exists()


def test_a_non_onnx_source_is_compared_through_its_converted_onnx(settings, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from bladeflow.tasks.benchmark.serving_tune import _source_onnx

    # setup: a version whose source is a Python callable; its run recorded the converted ONNX
    converted = mlp(tmp_path / "converted.onnx")
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    exp = c.create_experiment("e")
    run = c.create_run(exp)
    c.log_param(run.info.run_id, "converted_model", str(converted))
    c.create_registered_model("m")
    mv = c.create_model_version("m", "file:///x", run_id=run.info.run_id)
    c.set_model_version_tag("m", mv.version, registry.TAG_SOURCE, "pkg.mod:build")
    # execute / assert: the converted file is the baseline while it is on this machine
    assert _source_onnx(settings, "m", mv.version) == (converted, None)
    converted.unlink()
    path, why = _source_onnx(settings, "m", mv.version)
    assert path is None and why is not None and "not here either" in why
