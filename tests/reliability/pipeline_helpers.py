"""Helpers for the pipeline reliability tests: the real ``bladeflow`` CLI as a process, real
servers (MLflow, Prefect, SeaweedFS) started the way ``bladeflow up`` starts them, and a check of
the registry's invariants."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bladeflow.app import stack, stack_proc
from bladeflow.app.stack import StackConfig
from tests import models

BIN = [sys.executable, "-m", "bladeflow.app.cli"]
# What the CLI runs in these tests: one recipe besides the baseline, a token benchmark.
FAST = [
    "-b",
    "1",
    "--passes",
    "ort_graph:level=all",
    "--bench-rounds",
    "1",
    "--bench-iterations",
    "2",
]
S3_KEYS = {"AWS_ACCESS_KEY_ID": "rel-test", "AWS_SECRET_ACCESS_KEY": "rel-test-secret-4711"}


def cli_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run whose state all lives under ``home``."""
    env = {**os.environ, "BLADEFLOW_HOME": str(home)}
    env.pop("PREFECT_HOME", None)  # the CLI puts Prefect's state under BLADEFLOW_HOME
    for leaked in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(leaked, None)
    env.update(extra or {})
    return env


def run_cli(
    args: list[str], home: Path, extra: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [*BIN, *args],
        capture_output=True,
        text=True,
        env=cli_env(home, extra),
        timeout=timeout,
        cwd=home.parent,
    )


@dataclass
class CliProcess:
    """A CLI run in its own process group, stderr/stdout going to files."""

    proc: subprocess.Popen[bytes]
    stderr: Path
    stdout: Path
    started: float = field(default_factory=time.monotonic)

    def text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds until ``pattern`` shows on stderr; AssertionError if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"{pattern!r} not on stderr (rc={self.proc.poll()}); tail:\n{self.text()[-3000:]}"
        )

    def kill(self) -> None:
        """SIGKILL the whole process group (the CLI and the Prefect server it started)."""
        with _quiet():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()


def start_cli(
    args: list[str], home: Path, extra: dict[str, str] | None = None, tag: str = "run"
) -> CliProcess:
    home.mkdir(parents=True, exist_ok=True)
    err, out = home.parent / f"{tag}.stderr", home.parent / f"{tag}.stdout"
    with err.open("wb") as e, out.open("wb") as o:
        proc = subprocess.Popen(
            [*BIN, *args],
            stdout=o,
            stderr=e,
            env=cli_env(home, extra),
            cwd=home.parent,
            start_new_session=True,
        )
    return CliProcess(proc, err, out)


@contextmanager
def _quiet() -> Iterator[None]:
    with suppress(ProcessLookupError, PermissionError):
        yield


def mlp_source(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny MLP and real validation inputs for it."""
    src = models.mlp(folder / "mlp.onnx", features=8, seed=seed)
    data = folder / "val.npz"
    np.savez(data, x=np.random.default_rng(seed).standard_normal((16, 8)).astype(np.float32))
    return src, data


def sqlite_uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass
class RegistryState:
    versions: dict[str, dict[str, Any]]  # version -> {status, validated, run_id, source}
    aliases: dict[str, str]  # alias -> version
    runs: dict[str, str]  # run id -> status (optimize runs of the model)

    def describe(self) -> str:
        vs = ", ".join(
            f"v{v}:{d['status']}/validated={d['validated']}"
            for v, d in sorted(self.versions.items())
        )
        return f"versions [{vs or '-'}], aliases {self.aliases or '{}'}, runs " + (
            ", ".join(sorted(self.runs.values())) or "-"
        )


def registry_state(uri: str, name: str) -> RegistryState:
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        aliases = {a: str(v) for a, v in c.get_registered_model(name).aliases.items()}
    except MlflowException:
        aliases = {}
    versions = {
        str(mv.version): {
            "status": mv.status,
            "validated": mv.tags.get("bladeflow.validated"),
            "run_id": mv.run_id,
            "source": mv.source,
            "tags": dict(mv.tags),
        }
        for mv in c.search_model_versions(f"name = '{name}'")
    }
    runs: dict[str, str] = {}
    exp = c.get_experiment_by_name("bladeflow")
    if exp is not None:
        for r in c.search_runs(
            [exp.experiment_id], filter_string=f"tags.`bladeflow.model` = '{name}'"
        ):
            if r.data.tags.get("bladeflow.flow") == "optimize":
                runs[r.info.run_id] = r.info.status
    return RegistryState(versions, aliases, runs)


def invariant_problems(state: RegistryState) -> list[str]:
    """What breaks the registry's promises: aliases on unvalidated versions, unfinished versions."""
    problems = []
    for alias, version in state.aliases.items():
        v = state.versions.get(version)
        if v is None:
            problems.append(f"alias {alias} -> v{version}, which does not exist")
        elif v["validated"] != "true" or v["status"] != "READY":
            problems.append(
                f"alias {alias} -> v{version} ({v['status']}, validated={v['validated']})"
            )
    for version, v in state.versions.items():
        if v["status"] != "READY":
            problems.append(f"v{version} is {v['status']}")
    return problems


def model_loads(uri: str, name: str, version: str) -> bool:
    """Whether the version's artifacts download and run (not just its registry row)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    out = model.predict({"x": np.ones((2, 8), np.float32)})
    return bool(np.isfinite(np.asarray(out["y"])).all())


# --- real servers -----------------------------------------------------------------------------


@dataclass
class Server:
    cfg: StackConfig
    name: str
    url: str

    def stop(self, grace_s: float = 5) -> None:
        stack_proc.stop(self.cfg.run_dir, self.name, grace_s=grace_s)

    def start(self) -> None:
        env = stack.service_env(self.cfg, base={"PATH": os.environ.get("PATH", ""), **S3_KEYS})
        svc = stack.services(self.cfg, env)[self.name]
        rec = stack_proc.start(svc, self.cfg.run_dir, self.cfg.log_dir, self.cfg.host)
        stack_proc.wait_ready(svc, rec, self.cfg.timeout_s)


def mlflow_server(home: Path) -> Server:
    """A real ``mlflow server`` (SQLite under ``home``, artifacts in ``home/artifacts``)."""
    cfg = StackConfig(home=home, mlflow_port=stack_proc.free_port(), s3=False, timeout_s=120)
    (home / "artifacts").mkdir(parents=True, exist_ok=True)
    srv = Server(cfg, "mlflow", cfg.mlflow_url)
    srv.start()
    return srv


def s3_server(home: Path) -> Server:
    """A real SeaweedFS S3 server with the bucket created."""
    cfg = StackConfig(home=home, s3_port=stack_proc.free_port_block(8), timeout_s=90)
    (cfg.state_dir / "s3-data").mkdir(parents=True, exist_ok=True)
    srv = Server(cfg, "s3", cfg.s3_url)
    srv.start()
    env = stack.service_env(cfg, base={"PATH": os.environ.get("PATH", ""), **S3_KEYS})
    stack.ensure_bucket(cfg, env)
    return srv


def prefect_server(home: Path) -> Server:
    cfg = StackConfig(home=home, prefect_port=stack_proc.free_port(), s3=False, timeout_s=120)
    srv = Server(cfg, "prefect", cfg.prefect_api)
    srv.start()
    return srv
