"""A recorded pid that now belongs to another process (pid reuse) is never reported or signalled.

Three services run ``sys.executable``, so the command line alone cannot tell our MLflow server
from an unrelated Python process that got the same pid: the recorded start time must.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from bladeflow.app import stack_proc
from bladeflow.app.stack_proc import Record, Service


@pytest.fixture
def unrelated_python() -> Iterator[subprocess.Popen[bytes]]:
    """A Python process with the same argv[0] as the stack's Python services."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _record(run_dir: Path, proc: subprocess.Popen[bytes], proc_start: float) -> Record:
    rec = Record(
        name="mlflow",
        pid=proc.pid,
        argv=[sys.executable, "-m", "mlflow", "server"],
        log="",
        url="",
        port=0,
        started_at=time.time(),
        proc_start=proc_start,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    stack_proc.record_path(run_dir, rec.name).write_text(json.dumps(asdict(rec)))
    return rec


def test_a_pid_reused_by_another_python_process_is_not_alive_and_not_signalled(
    tmp_path: Path, unrelated_python: subprocess.Popen[bytes]
):
    # setup: the record's pid and argv[0] match the live process, its start time does not
    run_dir = tmp_path / "run"
    live_start = psutil.Process(unrelated_python.pid).create_time()
    rec = _record(run_dir, unrelated_python, proc_start=live_start - 3600)
    # execute
    alive = stack_proc.is_alive(rec)
    outcome = stack_proc.stop(run_dir, "mlflow", grace_s=1)
    # assert: not ours, left running, and the stale record is gone
    assert alive is False
    assert outcome.startswith("not running")
    time.sleep(0.2)
    assert unrelated_python.poll() is None
    assert not stack_proc.record_path(run_dir, "mlflow").exists()


def test_the_same_process_with_its_recorded_start_time_is_alive(
    tmp_path: Path, unrelated_python: subprocess.Popen[bytes]
):
    # setup: the control case of the test above: same pid, same start time
    live_start = psutil.Process(unrelated_python.pid).create_time()
    rec = _record(tmp_path / "run", unrelated_python, proc_start=live_start)
    # execute / assert
    assert stack_proc.is_alive(rec) is True


def test_start_records_the_process_start_time(tmp_path: Path):
    # setup
    svc = Service(
        name="sleeper",
        argv=[sys.executable, "-c", "import time; time.sleep(120)"],
        env={},
        health_url="http://127.0.0.1:9/",
        url="",
        port=0,
    )
    run_dir = tmp_path / "run"
    # execute
    rec = stack_proc.start(svc, run_dir, tmp_path / "logs", "127.0.0.1")
    try:
        stored = Record.load(stack_proc.record_path(run_dir, "sleeper"))
        live_start = psutil.Process(rec.pid).create_time()
    finally:
        outcome = stack_proc.stop(run_dir, "sleeper", grace_s=5)
    # assert
    assert stored is not None and stored.proc_start is not None
    assert abs(stored.proc_start - live_start) < 0.05
    assert outcome == "stopped"


def test_a_record_written_before_start_times_were_kept_still_loads(tmp_path: Path):
    # setup: an old record (no proc_start) of a process that has exited
    path = stack_proc.record_path(tmp_path, "web")
    path.write_text(
        json.dumps(
            {
                "name": "web",
                "pid": 2**22 + 7,
                "argv": ["x"],
                "log": "",
                "url": "",
                "port": 0,
                "started_at": 0.0,
            }
        )
    )
    # execute
    rec = Record.load(path)
    # assert
    assert rec is not None and rec.proc_start is None
    assert stack_proc.is_alive(rec) is False
