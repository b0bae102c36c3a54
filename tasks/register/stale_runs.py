"""Stale-run reaping: an optimize run whose process died never ends its MLflow run; the next run
of the same model marks it KILLED and deletes the unfinished versions it left."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from bladeflow.core import registry
from bladeflow.core.outcome import Outcome
from bladeflow.tasks.register.mlflow_registry import delete_quietly


def reap_stale_runs(c: Any, model_name: str, experiment_id: str) -> list[str]:
    """Mark optimize runs of ``model_name`` KILLED whose process is gone; return their ids.

    A SIGKILLed (or OOM-killed) flow never ends its MLflow run, which then shows RUNNING forever.
    Only runs owned by a process on this host that no longer exists are touched (a run of another
    host, or a live concurrent run, is left alone). Versions such a run created but never
    finished (no ``bladeflow.validated=true`` or not READY, and no alias) are deleted.
    """
    stale = c.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`bladeflow.model` = '{model_name}' and tags.`bladeflow.flow` = 'optimize' "
            "and attributes.status = 'RUNNING'"
        ),
        max_results=200,
    )
    reaped = []
    for run in stale:
        recorded = run.data.tags.get(registry.RUN_TAG_OWNER)
        if not recorded or _owner_alive(recorded):
            continue
        run_id = run.info.run_id
        aliased = _aliased_versions(c, model_name)
        deleted = []
        for mv in c.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'"):
            complete = mv.status == "READY" and mv.tags.get(registry.TAG_VALIDATED) == "true"
            if str(mv.version) not in aliased and not complete:
                delete_quietly(c, model_name, str(mv.version))
                deleted.append(str(mv.version))
        c.set_tag(run_id, registry.RUN_TAG_OUTCOME, Outcome.KILLED.value)
        c.set_tag(
            run_id,
            registry.RUN_TAG_REASON,
            f"the process that ran it ({recorded}) is gone and never ended the run (killed, or "
            f"MLflow was unreachable when it failed); marked KILLED by the next optimize run of "
            f"{model_name!r}"
            + (f"; deleted its unfinished version(s) {deleted}" if deleted else ""),
        )
        c.set_terminated(run_id, status="KILLED")
        reaped.append(run_id)
    return reaped


def _aliased_versions(c: Any, name: str) -> set[str]:
    from mlflow.exceptions import MlflowException

    try:
        return {str(v) for v in c.get_registered_model(name).aliases.values()}
    except MlflowException:
        return set()


def owner() -> dict[str, Any]:
    """This process, as recorded in a run's owner tag: host, pid and start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _process_start(pid)}


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _owner_alive(owner: str) -> bool:
    """Whether the process recorded in a run's owner tag may still run (unknown counts alive)."""
    try:
        info = json.loads(owner)
        host, pid, started = info["host"], int(info["pid"]), info.get("started")
    except (ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return started is None or _process_start(pid) in (None, started)
