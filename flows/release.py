"""The release flow: stage by stage from shadow to 100%, gated by live serving metrics.

The flow only wires the steps; the state machine lives in ``tasks/release/engine.py`` and the
registry is its source of truth. A failing gate, a rejected approval, an error or a cancellation
rolls the new version back (weight 0, no ``canary`` alias); success makes it the champion.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from pydantic import Field

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
from bladeflow.tasks.release.plan import ReleasePlan


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

    logger = get_run_logger()
    settings = Settings.from_env().with_tracking_uri(params.tracking_uri)
    r = Releaser(params, settings, flow_run_id=str(flow_run.id))
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
