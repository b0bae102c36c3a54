"""Which Prefect API a command's flow runs talk to, started once and reused.

Without an API, Prefect starts a temporary server inside every command (10-25 s on two cores,
never shared). bladeflow instead keeps one lightweight local server per ``BLADEFLOW_HOME``:

1. ``PREFECT_API_URL`` when set (the user's server, or ``source <home>/stack/env.sh``);
2. the Prefect server of ``bladeflow up`` when it runs for this home;
3. the local server under ``<home>/prefect-local/``: started in the background on first use,
   reused by later commands, replaced when its record is stale, stopped by ``bladeflow down``.

``BLADEFLOW_ORCHESTRATION=ephemeral`` keeps Prefect's temporary per-command server (the tests
use it, so they leave no process behind).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bladeflow.app import stack_proc as proc
from bladeflow.app.stack import StackConfig, prefect_server
from bladeflow.core.locks import file_lock
from bladeflow.core.settings import Settings

ENV_MODE = "BLADEFLOW_ORCHESTRATION"
NAME = "prefect-local"
# A cold server migrates its database first: on two busy cores that can take a minute.
START_TIMEOUT_S = 180.0


def local_dir(settings: Settings) -> Path:
    return settings.home / NAME


def _health(api: str) -> str:
    return f"{api}/health"


def _ready(status: int, body: bytes) -> bool:
    return status == 200 and body.strip() == b"true"  # same rule as stack.prefect_server


def running_api(settings: Settings) -> str | None:
    """The API of a healthy server this home already has (the stack's or the local one)."""
    stack = StackConfig(home=settings.home)
    for run_dir, name in ((stack.run_dir, "prefect"), (local_dir(settings), NAME)):
        rec = proc.Record.load(proc.record_path(run_dir, name))
        if rec and proc.is_alive(rec):
            api = f"{rec.url}/api"
            if proc.probe(_health(api), _ready):
                return api
    return None


def use_prefect_api(settings: Settings, say: object = None) -> str | None:
    """Point this process's Prefect client at a warm server; None for Prefect's temporary one.

    Call before ``prefect`` is imported (it reads ``PREFECT_API_URL`` at import).
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if os.environ.get(ENV_MODE, "local").lower() == "ephemeral":
        return None
    api = running_api(settings) or start_local(settings, say)
    os.environ["PREFECT_API_URL"] = api
    return api


def start_local(settings: Settings, say: object = None) -> str:
    """Start (or find, if another command just did) the local server; return its API URL."""
    folder = local_dir(settings)
    # Never two: whoever holds the lock starts it, the others find it healthy afterwards.
    with file_lock(folder / "start.lock", timeout_s=START_TIMEOUT_S + 30):
        api = running_api(settings)
        if api:
            return api
        proc.stop(folder, NAME, grace_s=10)  # a stale record (dead or unhealthy): replace it
        port = proc.free_port()
        service = prefect_server(NAME, "127.0.0.1", port, {**os.environ, **settings.environment()})
        url = service.url
        if callable(say):
            say(f"orchestration: starting a local Prefect server for {settings.home} (once)")
        started = time.monotonic()
        rec = proc.start(service, folder, folder, "127.0.0.1")
        proc.wait_ready(service, rec, START_TIMEOUT_S)
        if callable(say):
            say(
                f"orchestration: Prefect at {url} ready in {time.monotonic() - started:.1f} s; "
                "later commands reuse it (`bladeflow down` stops it)"
            )
        return f"{url}/api"


def stop_local(settings: Settings, grace_s: float = 15.0) -> str | None:
    """Stop the local server if this home has one; what happened, or None when there was none."""
    folder = local_dir(settings)
    if not proc.record_path(folder, NAME).exists():
        return None
    return proc.stop(folder, NAME, grace_s)
