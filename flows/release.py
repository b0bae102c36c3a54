"""The release flow: stage by stage from shadow to 100%, gated by live serving metrics.

The flow only wires the steps; the state machine lives in ``tasks/release/engine.py`` and the
registry is its source of truth. A failing gate, a rejected approval, an error or a cancellation
rolls the new version back (weight 0, no ``canary`` alias); success makes it the champion.

One release per model at a time: the flow holds the only slot of the Prefect global concurrency
limit ``bladeflow-release-<model>`` for its whole run. The Prefect server grants slots atomically,
so of two starts exactly one gets it, however slow either is; the lease tag in the registry
remains the visible record of who holds the release (``tasks/release/state.py``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from uuid import UUID

import httpx
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.input import RunInput
from pydantic import Field

from bladeflow.core.release_plan import ReleasePlan
from bladeflow.core.settings import Settings
from bladeflow.tasks.release import state as st
from bladeflow.tasks.release.engine import (
    Begin,
    ReleaseParams,
    Releaser,
    ReleaseResult,
    StageRecord,
)
from bladeflow.tasks.release.errors import ReleaseRolledBackError


class Approval(RunInput):
    """The form a person fills in the Prefect UI to let the release take its last step."""

    approve: bool = Field(description="true: go on to the last stage; false: roll back")
    approver: str = Field("", description="your name, recorded on the version")
    comment: str = Field("", description="why")


@task(name="release-begin", cache_policy=NO_CACHE)
def begin_task(r: Releaser) -> Begin:
    return r.begin()


@task(name="release-stage", task_run_name="stage-{index}", cache_policy=NO_CACHE)
def stage_task(r: Releaser, index: int) -> StageRecord:
    return r.run_stage(index)


@task(name="release-promote", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def promote_task(r: Releaser, reason: str) -> ReleaseResult:
    return r.promote(reason)


def _on_abnormal_end(flow: Any, flow_run: Any, state: Any) -> None:
    """Crashed or cancelled (e.g. from the UI): roll back if this run still owns the release."""
    from bladeflow.tasks.release import tracking

    params = ReleaseParams.model_validate(flow_run.parameters["params"])
    c = tracking.client(Settings.from_env().with_tracking_uri(params.tracking_uri))
    s = st.read_state(c, params.name)
    if s.lease is None or s.lease.flow_run_id != str(flow_run.id):
        return
    if s.canary == params.version and s.canary != s.champion:
        st.roll_back(c, params.name, params.version, f"flow run {state.name}", "prefect")
    st.drop_lease(c, params.name)


@flow(name="release", on_crashed=[_on_abnormal_end], on_cancellation=[_on_abnormal_end])
def release_flow(params: ReleaseParams) -> ReleaseResult:
    """Release one validated version: shadow -> 5% -> 25% -> 50% -> 100% -> champion.

    Raises:
        NotValidatedError: the version is not tagged bladeflow.validated=true.
        ReleaseConflictError: another release of the model holds the lease.
        ReleaseRolledBackError: a gate failed or approval was refused; the version was rolled
            back and the champion kept serving.
    """
    from prefect.runtime import flow_run

    settings = Settings.from_env().with_tracking_uri(params.tracking_uri)
    r = Releaser(params, settings, flow_run_id=str(flow_run.id))
    with exclusive_release(r, str(flow_run.id)):
        return _run(r, params)


def _run(r: Releaser, params: ReleaseParams) -> ReleaseResult:
    logger = get_run_logger()
    start = begin_task(r)
    if start.done:
        logger.info("release: %s", r.result.reason)
        return r.result
    try:
        stages = params.plan.stages
        for index in range(start.start_index, len(stages)):
            if params.approval and index == len(stages) - 1:
                stop = _approval(r, stages[index].name)
                if stop is not None:
                    r.roll_back(stop)
            record = stage_task(r, index)
            if record.decision == "aborted":
                return _aborted(r, record.reason)
            if record.decision != "pass":
                r.roll_back(record.reason)
        return promote_task(r, f"passed {len(stages)} stages")
    except ReleaseRolledBackError:
        raise
    except BaseException as exc:
        r.roll_back(f"error during the release: {type(exc).__name__}: {exc}")
        raise  # unreachable: roll_back raises


# The Prefect server refuses leases shorter than a minute. A release killed without a chance to
# release its slot blocks the next start for at most this long (or lease_ttl_s, if longer).
_MIN_SLOT_LEASE_S = 60.0
_MAX_SLOT_LEASE_S = 86400.0  # the server's upper bound
_HTTP_LOCKED = 423
_BANNED_IN_NAMES = re.compile(r"[/%&<>]")  # characters Prefect refuses in a limit's name


def limit_name(model: str) -> str:
    """The Prefect global concurrency limit that serializes the releases of ``model``."""
    safe = _BANNED_IN_NAMES.sub("_", model)
    if safe != model:  # keep two models that differ only there apart
        safe += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"bladeflow-release-{safe}"


def _ensure_single_slot_limit(name: str) -> None:
    """Create the limit with one active slot, or make an existing one so (idempotent).

    ``concurrency()`` silently skips a limit that does not exist, and an inactive limit or one
    with more slots excludes nothing.
    """
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )
            return
        except ObjectAlreadyExists:
            pass
        existing = client.read_global_concurrency_limit_by_name(name)
        if existing.limit != 1 or not existing.active:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
            )


@contextmanager
def exclusive_release(r: Releaser, flow_run_id: str) -> Iterator[None]:
    """Hold the only slot of the model's release limit, or fail at once if another run has it.

    The slot's lease is renewed in the background while the block runs; if this process dies, the
    Prefect server frees the slot when the lease runs out.

    Raises:
        ReleaseConflictError: another release of the model holds the slot.
    """
    name = limit_name(r.name)
    _ensure_single_slot_limit(name)
    with ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(
                    name,
                    occupy=1,
                    max_retries=0,  # a busy slot is a conflict to report, not a queue to join
                    lease_duration=min(
                        _MAX_SLOT_LEASE_S, max(_MIN_SLOT_LEASE_S, r.plan.lease_ttl_s)
                    ),
                    strict=True,  # a missing limit is an error, never "no limit"
                    holder=ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run_id)),
                    # A renewal that fails once (an API blip) must not kill a release half-way:
                    # while the slot is lost, the live lease tag still refuses a second start.
                    raise_on_lease_renewal_failure=False,
                )
            )
        except Exception as exc:  # Prefect wraps the server's answer in a private error type
            if not _is_locked(exc):
                raise
            holder = st.read_state(r.c, r.name).lease
            raise st.busy_error(r.name, holder, guard=name) from None
        r.lease.guard = name
        yield


def _is_locked(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) is the server's 423: every slot is taken."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, httpx.HTTPStatusError) and seen.response.status_code == _HTTP_LOCKED:
            return True
        seen = seen.__cause__
    return False


def _approval(r: Releaser, stage: str) -> str | None:
    """Pause until a person approves in the Prefect UI; the reason to stop, or None."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    r.before_approval()
    get_run_logger().info(
        "release: waiting for approval before stage %s (resume the flow run in the UI)", stage
    )
    try:
        answer = pause_flow_run(
            wait_for_input=Approval,
            timeout=r.plan.approval_timeout_s,
            poll_interval=r.plan.approval_poll_s,
            key=f"approve-{r.version}-{stage}",
        )
    except FlowPauseTimeout:
        return f"no approval within {r.plan.approval_timeout_s} s"
    return r.after_approval(answer.approve, answer.approver, answer.comment)


def _aborted(r: Releaser, reason: str) -> ReleaseResult:
    result = r.aborted(reason)
    if result.champion == r.version:
        result.outcome = "promoted"
        return result
    raise ReleaseRolledBackError(
        f"release of {r.name} version {r.version} was stopped: {reason}", reason, result.run_id
    )


__all__ = ["Approval", "ReleaseParams", "ReleasePlan", "ReleaseResult", "release_flow"]
