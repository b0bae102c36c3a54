"""Two starts of a release of one model: exactly one runs, however slow the other's writes are.

The lease tag alone (write, wait 0.3 s, read back) let a writer slower than 0.3 s believe it won
too. The flow now holds the only slot of a Prefect global concurrency limit, which the Prefect
server grants atomically. Real MLflow (SQLite) and real Prefect (the session's test harness); the
slow writer is the ``release.lease_write.<model>.<version>`` fault point, which pauses between
reading the lease and writing it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from bladeflow.core.faults import ENV_PAUSE_AT, ENV_PAUSE_S
from bladeflow.flows.release import limit_name, release_flow
from bladeflow.tasks.release import engine
from bladeflow.tasks.release import state as st
from bladeflow.tasks.release.errors import ReleaseConflictError
from tests.release.conftest import Background, quick_plan

pytestmark = pytest.mark.usefixtures("prefect_harness")

_SLOW_WRITE_S = 4.0


def _params(name: str, version: str) -> engine.ReleaseParams:
    return engine.ReleaseParams(
        name=name,
        version=version,
        endpoints=["http://127.0.0.1:9"],
        actor="tester",
        plan=quick_plan(),
    )


def _wait_for_pause(capfd: pytest.CaptureFixture[str], point: str, timeout: float = 90) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += capfd.readouterr().err
        if f"paused at {point}" in seen:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"the slow writer never reached {point}")


def test_a_start_racing_a_slow_lease_writer_is_refused(
    settings: Any,
    client: Any,
    add_version: Any,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
):
    # setup: no champion yet, so a start that gets through promotes its version at once
    name = "lease-race"
    slow, fast = add_version(name), add_version(name)
    point = f"release.lease_write.{name}.{slow}"
    monkeypatch.setenv(ENV_PAUSE_AT, point)
    monkeypatch.setenv(ENV_PAUSE_S, str(_SLOW_WRITE_S))
    # execute: the slow start has read "no lease" and is about to write it when the other starts
    first = Background(lambda: release_flow(_params(name, slow)))
    _wait_for_pause(capfd, point)
    with pytest.raises(ReleaseConflictError) as refused:
        release_flow(_params(name, fast))
    first.join(120)
    # assert: the slow start won and promoted its version; the other changed nothing
    assert first.error is None, first.error
    assert first.result.outcome == "promoted" and first.result.version == slow
    assert "already in progress" in str(refused.value)
    assert limit_name(name) in str(refused.value)
    s = st.read_state(client, name)
    assert (s.champion, s.canary, s.lease) == (slow, None, None)
    assert client.get_model_version(name, fast).tags.get(st.TAG_OUTCOME) is None


def test_the_slot_is_free_again_after_a_release(settings: Any, client: Any, add_version: Any):
    # setup: one release ran to the end (first release: promoted at once)
    name = "lease-reuse"
    v1 = add_version(name)
    release_flow(_params(name, v1))
    # execute: the next start of the model gets the slot (nothing to do: already the champion)
    again = release_flow(_params(name, v1))
    # assert
    assert again.outcome == "promoted" and "already the champion" in again.reason
    assert st.read_state(client, name).lease is None


def test_limit_names_are_valid_for_prefect_and_distinct():
    # execute
    names = {limit_name(m) for m in ("a/b", "a%b", "a_b", "plain")}
    # assert
    assert len(names) == 4
    assert all(not set("/%&<>") & set(n) for n in names)
    assert limit_name("plain") == "bladeflow-release-plain"
