"""The CLI's warm Prefect server: started once per home, reused, replaced when stale, stopped by
`bladeflow down`. Real `prefect server start` processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bladeflow.app import orchestration as orch
from bladeflow.app import stack_proc as proc
from bladeflow.core.settings import Settings


@pytest.fixture
def local_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(orch.ENV_MODE, "local")
    settings = Settings.from_env(home=tmp_path / "home", environ={})
    settings.home.mkdir(parents=True)
    yield settings
    orch.stop_local(settings, grace_s=5)


def _record(settings: Settings) -> proc.Record:
    rec = proc.Record.load(proc.record_path(orch.local_dir(settings), orch.NAME))
    assert rec is not None
    return rec


def test_the_local_server_starts_once_is_reused_and_stops_with_down(
    local_home: Settings, monkeypatch: pytest.MonkeyPatch
):
    # execute: first use starts it, the second finds it
    api = orch.start_local(local_home)
    first = _record(local_home)
    started = time.monotonic()
    again = orch.running_api(local_home)
    reuse_s = time.monotonic() - started
    # assert
    assert again == api and reuse_s < 2.0
    assert proc.probe(f"{api}/health")
    # execute: `bladeflow down` for this home
    env = {**os.environ, "BLADEFLOW_HOME": str(local_home.home)}
    out = subprocess.run(
        [sys.executable, "-m", "bladeflow.app.cli", "down", "--json", "--grace", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # assert
    assert out.returncode == 0, out.stderr
    assert '"prefect-local": "stopped"' in out.stdout
    assert not proc.is_alive(first)


@pytest.mark.slow
def test_a_dead_server_is_replaced(local_home: Settings):
    # setup
    orch.start_local(local_home)
    first = _record(local_home)
    os.killpg(first.pid, signal.SIGKILL)
    time.sleep(0.5)
    # execute
    api = orch.start_local(local_home)
    # assert
    second = _record(local_home)
    assert second.pid != first.pid and proc.probe(f"{api}/health")
