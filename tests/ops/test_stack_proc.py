"""Process management of the local stack: start detached, wait for health, stop the whole group."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from bladeflow.app import stack_proc
from bladeflow.app.stack import StackConfig, services, stack_status, write_env_file
from bladeflow.app.stack_proc import Record, Service, StackError


def _http_service(tmp_path: Path, port: int) -> Service:
    # A shell that forks an HTTP server and a sleeper: stop() must reach both children.
    script = f"{sys.executable} -m http.server {port} --bind 127.0.0.1 & sleep 300 & wait"
    return Service(
        name="web",
        argv=["/bin/sh", "-c", script],
        env={"PATH": os.environ["PATH"]},
        health_url=f"http://127.0.0.1:{port}/",
        url=f"http://127.0.0.1:{port}",
        port=port,
    )


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_start_waits_for_health_and_stop_ends_the_whole_process_group(tmp_path: Path):
    # setup
    port = stack_proc.free_port()
    svc = _http_service(tmp_path, port)
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    # execute
    rec = stack_proc.start(svc, run_dir, log_dir, "127.0.0.1")
    try:
        elapsed = stack_proc.wait_ready(svc, rec, timeout_s=60)
        members = _group_members(rec.pid)
        again = stack_proc.start(svc, run_dir, log_dir, "127.0.0.1")
    finally:
        outcome = stack_proc.stop(run_dir, "web", grace_s=10)
    # assert
    assert elapsed >= 0 and len(members) >= 3  # sh, python http.server, sleep
    assert again.pid == rec.pid  # a running service is not started twice
    assert outcome == "stopped"
    assert _group_members(rec.pid) == []
    assert not stack_proc.record_path(run_dir, "web").exists()
    assert not stack_proc.port_in_use("127.0.0.1", port)


def test_a_port_taken_by_someone_else_is_refused_with_advice(tmp_path: Path):
    # setup
    port = stack_proc.free_port()
    blocker = _http_service(tmp_path, port)
    blocker_rec = stack_proc.start(blocker, tmp_path / "other", tmp_path / "logs", "127.0.0.1")
    try:
        stack_proc.wait_ready(blocker, blocker_rec, timeout_s=60)
        # execute / assert
        with pytest.raises(StackError, match=f"port {port} .* already in use"):
            stack_proc.start(blocker, tmp_path / "run", tmp_path / "logs", "127.0.0.1")
    finally:
        stack_proc.stop(tmp_path / "other", "web", grace_s=10)


def test_a_reused_pid_is_not_mistaken_for_the_service(tmp_path: Path):
    # setup: a record whose pid is alive (this test process) but runs another command
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = Record("web", os.getpid(), ["/no/such/weed"], "", "", 0, time.time())
    stack_proc.record_path(run_dir, "web").write_text(json.dumps(rec.__dict__))
    # execute
    outcome = stack_proc.stop(run_dir, "web", grace_s=1)
    # assert: nothing was signalled (we are still here) and the stale record is gone
    assert outcome.startswith("not running")
    assert not stack_proc.record_path(run_dir, "web").exists()


def test_a_service_that_exits_during_start_up_reports_its_log(tmp_path: Path):
    # setup
    svc = Service(
        name="broken",
        argv=["/bin/sh", "-c", "echo 'cannot open database' >&2; exit 3"],
        env={"PATH": os.environ["PATH"]},
        health_url="http://127.0.0.1:9/",
        url="",
        port=0,
    )
    rec = stack_proc.start(svc, tmp_path / "run", tmp_path / "logs", "127.0.0.1")
    # execute / assert
    with pytest.raises(StackError, match=r"exited during start-up(.|\n)*cannot open database"):
        stack_proc.wait_ready(svc, rec, timeout_s=30)


def test_status_and_env_file_describe_a_stack_that_is_not_running(tmp_path: Path):
    # setup
    cfg = StackConfig(home=tmp_path, prefect_port=14999, mlflow_port=15999, s3_port=18999)
    cfg.state_dir.mkdir(parents=True)
    env = {**cfg.client_env(), "AWS_ACCESS_KEY_ID": "bladeflow-local"}
    env["AWS_SECRET_ACCESS_KEY"] = "bladeflow-local"
    # execute
    status = stack_status(cfg)
    env_file = write_env_file(cfg, env).read_text()
    argv = services(cfg, env)
    # assert
    assert set(status) == {"s3", "mlflow", "prefect", "worker"}
    assert not any(s["running"] or s["healthy"] for s in status.values())
    assert "export PREFECT_API_URL=http://127.0.0.1:14999/api" in env_file
    assert "export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:18999" in env_file
    assert "export BLADEFLOW_ARTIFACT_ROOT=s3://bladeflow/artifacts" in env_file
    assert argv["mlflow"].env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "--workers" in argv["mlflow"].argv and "1" in argv["mlflow"].argv
    assert argv["prefect"].env["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:14999/api"
    assert "-ip.bind=127.0.0.1" in argv["s3"].argv and "-master.telemetry=false" in argv["s3"].argv
