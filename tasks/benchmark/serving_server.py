"""The real ``bladeflow serve`` as a subprocess on a loopback port, for the serving tuner.

Stages may not import ``serving/`` or the CLI, so the tuner starts the server the way a user
does (``python -m bladeflow.app.cli serve --model NAME --version V`` plus the configuration as
flags) and talks HTTP to it: what is tuned is exactly what runs in production. Also here: the
server-side numbers (a diff of two ``/metrics`` scrapes), the server's CPU time, and a throwaway
registry that serves the unoptimized source behind the same server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bladeflow.core import registry
from bladeflow.core.contract import SessionConfig
from bladeflow.core.errors import UserInputError
from bladeflow.core.settings import Settings

READY_TIMEOUT_S = 180.0  # two busy cores: importing MLflow alone took 9 s of wall time
# The source as the accuracy gate and the benchmark run it: no load-time graph rewrites
# (tasks/optimize/recipes.py BASELINE_SESSION), so "saved" counts every optimization.
SOURCE_SESSION = SessionConfig(graph_optimization_level="disable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServedModel:
    """Which registered version to serve, from which registry."""

    settings: Settings
    name: str
    version: str
    label: str  # "chosen" or "source", in tables


@dataclass
class ServerProcess:
    """One ``bladeflow serve`` subprocess (its own process group) with one configuration."""

    model: ServedModel
    flags: list[str]
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        m = self.model
        cmd = [
            sys.executable, "-m", "bladeflow.app.cli", "serve",
            "--model", m.name, "--version", m.version,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--poll-interval", "3600",  # no registry polls while it is measured
            "--log-level", "warning",
            "--home", str(m.settings.home), "--tracking-uri", m.settings.tracking_uri,
            *self.flags,
        ]  # fmt: skip
        env = {**os.environ, **m.settings.environment(), "BLADEFLOW_SERVE_TOKEN": ""}
        env.pop("PREFECT_API_URL", None)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.started = time.monotonic()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Block until ``/v2/health/ready`` answers 200; return the seconds since start."""
        assert self.proc is not None, "start() first"
        deadline = self.started + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}: {self._log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r,
            ):
                if r.status == 200:
                    return time.monotonic() - self.started
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready in {timeout_s:.0f} s: {self._log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        import psutil

        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def metadata(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/v2/models/{self.model.name}", timeout=10) as r:
            return dict(json.loads(r.read()))

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def servers(procs: Sequence[ServerProcess]) -> Iterator[list[ServerProcess]]:
    """Start every server at once (their start-ups overlap), wait for all, stop all on exit.

    The servers that are not being measured sit idle (no polls, no spinning threads).
    """
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready()
        yield list(procs)
    finally:
        for p in procs:
            p.stop()


@dataclass
class ServerSample:
    """One ``/metrics`` scrape: answered requests and the latency histogram of one model."""

    ok: float
    buckets: dict[float, float]

    def minus(self, earlier: ServerSample) -> ServerSample:
        return ServerSample(
            self.ok - earlier.ok,
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
        )


def scrape(url: str, model: str) -> ServerSample:
    """Sum the model's 200 answers and request-duration buckets over versions and roles."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    ok, buckets = 0.0, dict[float, float]()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "bladeflow_requests_total" and s.labels.get("status") == "200":
                ok += s.value
            elif s.name == "bladeflow_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return ServerSample(ok, buckets)


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus' ``histogram_quantile`` (linear inside the bucket), in the buckets' unit."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def source_registry(source_onnx: Path, name: str, folder: Path) -> ServedModel:
    """Register the source ONNX in a throwaway SQLite registry under ``folder`` as version 1.

    The user's registry is not touched; the same server code serves it, with the session the
    benchmark gives the source (no load-time graph rewrites).
    """
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    home = folder / "source-registry"
    settings = Settings.from_env(home=home, environ={})
    settings.home.mkdir(parents=True, exist_ok=True)
    Path(settings.artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    local = home / "model"
    runtime = home / registry.RUNTIME_FILE
    runtime.write_text(SOURCE_SESSION.model_dump_json())
    if local.exists():
        raise UserInputError(f"{local} already exists; use an empty work folder")
    mlflow.onnx.save_model(
        onnx.load(str(source_onnx)),
        str(local),
        extra_files=[str(runtime)],
        pip_requirements=["onnxruntime"],  # skips MLflow's slow requirement inference
    )
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    exp = c.create_experiment("bladeflow-source", artifact_location=settings.artifact_root)
    run = c.create_run(exp)
    c.log_artifacts(run.info.run_id, str(local), "model")
    c.set_terminated(run.info.run_id)
    c.create_registered_model(name)
    tags = {registry.TAG_RECIPE: registry.recipe_json([], SOURCE_SESSION)}
    mv = c.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
    )
    return ServedModel(settings, name, str(mv.version), "source")
