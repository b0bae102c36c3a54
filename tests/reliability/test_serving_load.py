"""Serving under load: overload at 2.5x capacity, hot swap and rollback under load, an unreachable
registry, and a soak run. Real ``bladeflow serve`` processes, a real MLflow registry, real ONNX
Runtime.

The machine has 2 cores and the load generator (one asyncio thread in this process) shares them
with the server, so "capacity" is measured here, in the same run, with the generator running: a
model with a long, fixed service time (~15 ms per request on one ORT thread; batching off) keeps
the server model-bound, so the generator's own CPU use (a few % at these rates) barely moves it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests import models
from tests.reliability.serving_helpers import Load, pct, reg, rss_mib, wait_for
from tests.serving.conftest import (
    Registry,
    Server,
    free_port,
    heavy_model,
    infer_body,
    metric_value,
    start_server,
)

__all__ = ["reg"]  # the fixture, imported for pytest

pytestmark = pytest.mark.slow

QUEUE = 8  # --max-queue-size
WORKERS = 1  # --workers
ROWS = 64  # rows per request: ~15 ms of matmuls on one ORT thread
TIMEOUT_S = 10.0  # --request-timeout


@pytest.fixture(scope="module")
def heavy(reg: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("heavy")
    reg.register("heavy", heavy_model(d / "heavy.onnx", depth=8))
    srv = start_server(
        reg,
        d,
        ["heavy"],
        "--max-batch-size", "1",  # batching off: one request = one fixed-cost run
        "--max-queue-size", str(QUEUE),
        "--workers", str(WORKERS),
        "--request-timeout", str(TIMEOUT_S),
        "--poll-interval", "30",
    )  # fmt: skip
    yield srv
    srv.stop()


def _body() -> bytes:
    return orjson.dumps(infer_body(np.ones((ROWS, 16), np.float32)))


def _inference_seconds(srv: Server) -> tuple[float, float]:
    text = srv.metrics()
    return (
        metric_value(text, "bladeflow_inference_duration_seconds_sum", model="heavy"),
        metric_value(text, "bladeflow_inference_duration_seconds_count", model="heavy"),
    )


@pytest.fixture(scope="module")
def capacity(heavy: Server) -> dict[str, float]:
    """Closed-loop throughput: 4 clients (< queue size, so nothing is refused) for 6 s."""
    url = f"{heavy.url}/v2/models/heavy/infer"
    Load(url, _body(), concurrency=4).run_for(2)  # warm-up, discarded
    s0, n0 = _inference_seconds(heavy)
    seconds = 6.0
    results = Load(url, _body(), concurrency=4).run_for(seconds)
    s1, n1 = _inference_seconds(heavy)
    codes = Counter(r.status for r in results)
    assert set(codes) == {200}, codes
    return {
        "rps": codes[200] / seconds,
        "service_s": (s1 - s0) / max(1.0, n1 - n0),
        "p50_s": pct([r.latency for r in results], 50),
    }


def test_overload_at_2_5x_capacity(heavy: Server, capacity: dict[str, float], scenario):
    s = scenario(
        "overload 2.5x capacity",
        fault="open-loop load at 2.5x the measured closed-loop capacity for 15 s",
        expected="admitted p99 <= (queue+workers+1) x service time x 3 + 0.25 s; the model "
        "stays >= 60% busy; the excess gets 429 with p99 < 0.25 s; zero 5xx/connection errors; "
        "RSS growth < 50 MiB",
    )
    # setup
    rate = 2.5 * capacity["rps"]
    service = capacity["service_s"]
    rss_before = rss_mib(heavy.proc.pid)
    s0, n0 = _inference_seconds(heavy)
    # execute
    seconds = 15.0
    results = Load(f"{heavy.url}/v2/models/heavy/infer", _body(), rate=rate).run_for(seconds)
    s1, n1 = _inference_seconds(heavy)
    rss_after = rss_mib(heavy.proc.pid)
    # assert
    codes = Counter(r.status for r in results)
    ok = [r.latency for r in results if r.status == 200]
    refused = [r.latency for r in results if r.status == 429]
    service_under_load = (s1 - s0) / max(1.0, n1 - n0)
    busy = (s1 - s0) / seconds / WORKERS  # share of the time the model was running
    # An admitted request waits for at most QUEUE requests ahead of it plus WORKERS running, then
    # runs: (QUEUE + WORKERS + 1) service times. x3: neighbours on this shared VM swing the
    # service time that much within minutes (STACK-NOTES); + 0.25 s for HTTP and the event loop.
    # The service time is the one measured in the same window (the server's own histogram).
    bound = (QUEUE + WORKERS + 1) * service_under_load * 3 + 0.25
    s.observe(
        f"capacity {capacity['rps']:.1f} req/s (closed loop, 4 clients, service "
        f"{service * 1000:.1f} ms); sent {len(results)} at {rate:.1f} req/s: {dict(codes)}; "
        f"admitted {len(ok) / seconds:.1f} req/s p50 {pct(ok, 50) * 1000:.0f} ms "
        f"p99 {pct(ok, 99) * 1000:.0f} ms (bound {bound * 1000:.0f} ms, service under load "
        f"{service_under_load * 1000:.1f} ms, model busy {busy:.0%}); 429 p50 "
        f"{pct(refused, 50) * 1000:.1f} ms p99 "
        f"{pct(refused, 99) * 1000:.1f} ms; RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )
    assert heavy.proc.poll() is None, "server died"
    assert set(codes) <= {200, 429}, codes  # no 5xx, no connection errors (status 0)
    assert codes[429] >= 0.1 * len(results), "the load did not overload the server"
    assert busy >= 0.6, "the model sat idle while requests were refused"
    assert pct(ok, 99) < TIMEOUT_S
    assert pct(ok, 99) <= bound
    assert pct(refused, 99) < 0.25 and pct(refused, 50) < 0.05
    assert rss_after - rss_before < 50


def test_soak_steady_load_memory_stays_flat(heavy: Server, scenario):
    soak_s = float(os.environ.get("BLADEFLOW_SOAK_SECONDS", "180"))
    warm_s = 30.0
    s = scenario(
        "soak",
        fault=f"steady load for {soak_s:.0f} s (2 clients, closed loop: the model stays busy, "
        "the queue never fills), RSS sampled every 5 s",
        expected="zero failed requests; RSS growth after a 30 s warm-up < 32 MiB and < 15%",
    )
    # setup
    # Closed loop, not open: a fixed rate would meet the neighbours' CPU swings on this shared
    # VM with 429s that say nothing about memory; 2 clients < queue size never see one.
    load = Load(f"{heavy.url}/v2/models/heavy/infer", _body(), concurrency=2)
    samples: list[tuple[float, float]] = []
    # execute
    start = time.monotonic()
    load.start()
    while time.monotonic() - start < soak_s:
        samples.append((time.monotonic() - start, rss_mib(heavy.proc.pid)))
        time.sleep(5)
    results = load.stop()
    samples.append((time.monotonic() - start, rss_mib(heavy.proc.pid)))
    # assert
    codes = Counter(r.status for r in results)
    after_warm = [m for t, m in samples if t >= warm_s]
    base = after_warm[0]
    growth = max(after_warm) - base
    ok = [r.latency for r in results if r.status == 200]
    s.observe(
        f"{len(results)} requests in {soak_s:.0f} s ({len(results) / soak_s:.1f} req/s): "
        f"{dict(codes)}; p99 {pct(ok, 99) * 1000:.0f} ms; RSS at start {samples[0][1]:.1f}, "
        f"after warm-up {base:.1f}, max {max(after_warm):.1f}, end {samples[-1][1]:.1f} MiB "
        f"(growth {growth:.1f} MiB = {100 * growth / base:.1f}%, {len(samples)} samples)"
    )
    assert heavy.proc.poll() is None
    assert set(codes) == {200}, codes
    assert growth < 32 and growth / base < 0.15


def test_hot_swap_and_rollback_under_load(reg: Registry, tmp_path: Path, scenario):
    s = scenario(
        "hot swap + rollback under load",
        fault="champion alias moved v1 -> v2, then back to v1, under 100 req/s open-loop load",
        expected="zero failed requests; responses switch to v2, then back to v1, within "
        "poll interval + load time",
    )
    # setup
    v1 = reg.register("swap", models.mlp(tmp_path / "a" / "m.onnx", seed=1))
    v2 = reg.register("swap", models.mlp(tmp_path / "b" / "m.onnx", seed=2), alias=None)
    srv = start_server(reg, tmp_path, ["swap"], "--poll-interval", "0.5")
    body = orjson.dumps(infer_body(np.ones((1, 8), np.float32)))
    load = Load(f"{srv.url}/v2/models/swap/infer", body, rate=100).start()
    client = reg.client()
    try:
        # execute
        time.sleep(2)
        moved = time.monotonic()
        client.set_registered_model_alias("swap", "champion", v2)
        to_v2 = wait_for(lambda: any(r.version == v2 for r in load.since(moved)), 30)
        first_v2 = min((r.sent for r in load.since(moved) if r.version == v2), default=moved)
        time.sleep(2)
        back = time.monotonic()
        client.set_registered_model_alias("swap", "champion", v1)
        to_v1 = wait_for(lambda: any(r.version == v1 for r in load.since(back)), 30)
        first_back = min((r.sent for r in load.since(back) if r.version == v1), default=back)
        time.sleep(2)
    finally:
        results = load.stop()
        srv.stop()
    # assert
    codes = Counter(r.status for r in results)
    # requests sent after the swap took effect (+0.2 s slack) answer from the new version only
    during_v2 = [r.version for r in results if first_v2 + 0.2 <= r.sent < back]
    after = [r.version for r in results if r.sent >= first_back + 0.2]
    s.observe(
        f"{len(results)} requests: {dict(codes)}; v1->v2 took {first_v2 - moved:.2f} s, rollback "
        f"took {first_back - back:.2f} s; after the swap {Counter(during_v2)}, after rollback "
        f"{Counter(after)}"
    )
    assert set(codes) == {200}, codes
    assert to_v2 and to_v1
    assert during_v2 and set(during_v2) == {v2}
    assert after and set(after) == {v1}


def _mlflow_server(reg: Registry, port: int, log: Path) -> subprocess.Popen:
    db = reg.settings.tracking_uri
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", db, "--default-artifact-root", reg.settings.artifact_root,
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true"}
    with log.open("a") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    ok = wait_for(lambda: _up(port) or proc.poll() is not None, 120, every=0.5)
    if not ok or proc.poll() is not None:
        _kill(proc)
        raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-2000:]}")
    return proc


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_registry_unreachable_keeps_serving_and_reports(reg: Registry, tmp_path: Path, scenario):
    s = scenario(
        "registry unreachable",
        fault="the MLflow tracking server the server polls is SIGKILLed, then restarted",
        expected="200s continue; bladeflow_registry_up 0 and the error in /v2/models/<name> "
        "within a few polls; back to 1 after the restart",
    )
    # setup: the model lives in the SQLite store; the server reads it through `mlflow server`
    reg.register("remote", models.mlp(tmp_path / "m.onnx"))
    port = free_port()
    mlog = tmp_path / "mlflow.log"
    mlflow_proc = _mlflow_server(reg, port, mlog)
    remote = Registry(reg.settings.with_tracking_uri(f"http://127.0.0.1:{port}"))
    remote.env = {**reg.env, "MLFLOW_TRACKING_URI": remote.settings.tracking_uri}
    remote.env["MLFLOW_REGISTRY_URI"] = remote.settings.tracking_uri
    srv = start_server(remote, tmp_path, ["remote"], "--poll-interval", "0.5")
    load = Load(
        f"{srv.url}/v2/models/remote/infer", orjson.dumps(infer_body(np.ones((1, 8), np.float32)))
    )
    load.rate = 50
    load.start()
    h = srv.http()

    def registry_up() -> float:
        return metric_value(h.get("/metrics").text, "bladeflow_registry_up")

    try:
        assert wait_for(lambda: registry_up() == 1, 10)
        # execute
        _kill(mlflow_proc)
        killed = time.monotonic()
        down = wait_for(lambda: registry_up() == 0, 60)
        noticed = time.monotonic() - killed
        doc = h.get("/v2/models/remote").json()["bladeflow"]
        time.sleep(3)  # keep serving with the registry down
        served_while_down = Counter(r.status for r in load.since(killed))
        restarted = time.monotonic()
        mlflow_proc = _mlflow_server(reg, port, mlog)
        up = wait_for(lambda: registry_up() == 1, 60)
        recovered = time.monotonic() - restarted
        doc_after = h.get("/v2/models/remote").json()["bladeflow"]
    finally:
        results = load.stop()
        h.close()
        srv.stop()
        _kill(mlflow_proc)
    # assert
    codes = Counter(r.status for r in results)
    s.observe(
        f"{len(results)} requests: {dict(codes)} ({dict(served_while_down)} while down); "
        f"registry_up 0 after {noticed:.1f} s, model status up="
        f"{doc['registry_status']['up']} error {str(doc['registry_status']['error'])[:70]!r}; "
        f"back to 1 {recovered:.1f} s after the restart began"
    )
    assert set(codes) == {200}, codes
    assert served_while_down[200] > 0
    assert down and noticed < 30
    assert doc["registry_status"]["up"] is False and doc["registry_status"]["error"]
    assert up and doc_after["registry_status"]["up"] is True
    assert doc_after["registry_status"]["error"] is None
