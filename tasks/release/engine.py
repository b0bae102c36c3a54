"""The release state machine: begin (lease, recovery, resume), run a stage, roll back, promote.

The registry is the source of truth; this object only carries handles (MLflow client, scraper,
lease) between steps. States of a model, as the registry shows them::

    IDLE ──start──> STAGE i (canary alias, weight_i, shadow_i, lease) ──pass──> STAGE i+1 ...
      ^                 │ gate fails / rejected / error / cancelled               │ last passes
      └── ROLLED BACK <─┘ (weight 0, no canary, version tagged rolled_back)       v
      └──────────────────────────────────────────── PROMOTED (champion=new, previous kept)

A release that dies leaves STAGE i with a lease that stops being renewed. The next ``start``
(after the lease expires) resumes it at stage i when it names the same version, and otherwise
rolls it back first; ``status`` shows it; ``rollback``/``promote`` end it at any time.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time

from pydantic import BaseModel, Field

from bladeflow.core.params import ReleaseParams
from bladeflow.core.release_plan import OnInsufficientTraffic
from bladeflow.core.settings import Settings
from bladeflow.tasks.release import state as st
from bladeflow.tasks.release import tracking
from bladeflow.tasks.release.errors import ReleaseRolledBackError
from bladeflow.tasks.release.gates import Decision, GateResult, champion_reference, judge
from bladeflow.tasks.release.metrics import RoleStats, Samples, delta, total
from bladeflow.tasks.release.scrape import Scraper

log = logging.getLogger("bladeflow.release")

ENV_ACTOR = "BLADEFLOW_ACTOR"
ENV_TOKEN = "BLADEFLOW_SERVE_TOKEN"


def default_actor() -> str:
    return os.environ.get(ENV_ACTOR) or getpass.getuser()


class StageRecord(BaseModel):
    """What happened in one stage."""

    index: int
    name: str
    weight: int
    shadow_share: int
    decision: str  # pass | fail | aborted
    reason: str = ""
    started_at: float = 0.0  # epoch seconds: when the judged window began
    ended_at: float = 0.0
    metrics: dict[str, float] = Field(default_factory=dict)
    gates: list[GateResult] = Field(default_factory=list)


class ReleaseResult(BaseModel):
    """What the release flow returns (and ``bladeflow release start --json`` prints)."""

    name: str
    version: str
    outcome: str  # promoted | rolled_back | aborted
    reason: str = ""
    run_id: str | None = None
    champion: str | None = None
    previous_champion: str | None = None
    resumed_at_stage: int | None = None
    stages: list[StageRecord] = Field(default_factory=list)


class Begin(BaseModel):
    """Where the release starts: ``done`` when nothing is left to do (first release etc.)."""

    start_index: int = 0
    done: bool = False


class Releaser:
    """One release of one version; every method is a step of the state machine."""

    def __init__(self, params: ReleaseParams, settings: Settings, flow_run_id: str | None = None):
        self.params = params
        self.plan = params.plan
        self.name = params.name
        self.version = str(params.version)
        self.actor = params.actor or default_actor()
        self.settings = settings
        self.c = tracking.client(settings)
        self.lease = st.Lease(
            holder=f"{self.actor}@{socket.gethostname()} pid {os.getpid()}",
            version=self.version,
            expires=time.time() + self.plan.lease_ttl_s,
            flow_run_id=flow_run_id,
        )
        self.scraper = Scraper(params.endpoints, self.name, token=os.environ.get(ENV_TOKEN))
        self.champion: str | None = None
        self.reference: RoleStats | None = None  # the champion's numbers from the last stage
        self.result = ReleaseResult(name=self.name, version=self.version, outcome="in_progress")

    # --- begin ---------------------------------------------------------------------------------

    def begin(self) -> Begin:
        """Check the version, take the lease, repair what a dead release left, open the run."""
        st.require_validated(self.c, self.name, self.version)
        stale = st.acquire_lease(self.c, self.name, self.lease)
        try:
            start = self._recover(stale)
            state = st.read_state(self.c, self.name)
            self.champion = state.champion
            self.result.run_id = tracking.start_run(
                self.c,
                self.settings,
                self.name,
                self.version,
                {
                    "model": self.name,
                    "version": self.version,
                    "actor": self.actor,
                    "champion_at_start": state.champion or "",
                    "approval": self.params.approval,
                    "endpoints": self.params.endpoints,
                    "resumed_at_stage": start,
                    "plan": self.plan.model_dump(mode="json"),
                },
            )
            self.lease.run_id = self.result.run_id
            st.renew_lease(self.c, self.name, self.lease, self.plan.lease_ttl_s)
            if state.champion == self.version:
                self._finish("promoted", f"version {self.version} is already the champion")
                return Begin(done=True)
            if state.champion is None:
                self.promote("first release: no champion to compare against")
                return Begin(done=True)
            st.tag_version(
                self.c,
                self.name,
                self.version,
                {
                    st.TAG_OUTCOME: st.IN_PROGRESS,
                    st.TAG_REASON: "",
                    st.TAG_RUN_ID: self.result.run_id,
                    st.TAG_ACTOR: self.actor,
                },
            )
            self.result.resumed_at_stage = start
            return Begin(start_index=start or 0)
        except BaseException:
            st.drop_lease(self.c, self.name, self.lease)
            raise

    def _recover(self, stale: st.Lease | None) -> int | None:
        """Bring a model a dead release left behind to a consistent state.

        Returns:
            The stage to resume this version's interrupted release at, or None (fresh start).
        """
        state = st.read_state(self.c, self.name)
        if state.canary is None:
            return None
        who = f"the release held by {stale.describe()}" if stale else "an unfinished release"
        if state.canary == state.champion:  # died while promoting: finish that promotion
            st.promote(
                self.c, self.name, state.canary, f"promotion finished after {who}", self.actor
            )
            return None
        if state.canary == self.version:
            tags = st.version_tags(self.c, self.name, self.version)
            if tags.get(st.TAG_OUTCOME) in {st.IN_PROGRESS, st.AWAITING_APPROVAL}:
                index = int(tags.get(st.TAG_STAGE_INDEX, "0") or 0)
                index = min(max(index, 0), len(self.plan.stages) - 1)
                log.warning("resuming %s stopped at stage %d", who, index)
                return index
        st.roll_back(
            self.c,
            self.name,
            state.canary,
            f"{who} was abandoned; rolled back before releasing version {self.version}",
            self.actor,
        )
        return None

    # --- stages --------------------------------------------------------------------------------

    def run_stage(self, index: int) -> StageRecord:
        """Give the canary this stage's traffic and judge it until pass, fail or abort."""
        stage = self.plan.stages[index]
        record = StageRecord(
            index=index,
            name=stage.name,
            weight=stage.weight,
            shadow_share=stage.shadow_share,
            decision="fail",
        )
        if not self._still_ours(record, canary_set=False):
            return self._close(record)
        # The stage is recorded before traffic moves: a crash in between resumes this stage.
        st.tag_version(
            self.c,
            self.name,
            self.version,
            {
                st.TAG_OUTCOME: st.IN_PROGRESS,
                st.TAG_STAGE: stage.name,
                st.TAG_STAGE_INDEX: str(index),
            },
        )
        st.set_traffic(self.c, self.name, self.version, stage.weight, stage.shadow_share)
        log.info("stage %s: weight %d%%, shadow %d%%", stage.name, stage.weight, stage.shadow_share)
        pending = self.scraper.wait_applied(
            self.champion, self.version, stage.weight, self.plan.sync_timeout_s
        )
        if pending:
            record.reason = (
                f"stage {stage.name}: serving did not apply the change within "
                f"{self.plan.sync_timeout_s:g} s: "
                + "; ".join(f"{u}: {w}" for u, w in pending.items())
            )
            return self._close(record)
        base: dict[str, Samples | None] = dict(self.scraper.scrape().samples)
        last: dict[str, Samples] = {}
        started = time.monotonic()
        record.started_at = time.time()
        holding = False
        while True:
            time.sleep(self.plan.poll_interval_s)
            if not self._still_ours(record):
                return self._close(record)
            scrape = self.scraper.scrape()
            for url, samples in scrape.samples.items():
                if samples is None:
                    continue
                if base.get(url) is None:
                    base[url] = samples  # unreachable at the start: its window begins now
                last[url] = samples
            window = total(delta(base.get(u), s) for u, s in last.items())
            current = champion_reference(window, self.champion, stage.min_requests)
            elapsed = time.monotonic() - started
            verdict = judge(
                window, stage, self.plan.gates, self.version, current or self.reference, elapsed
            )
            record.metrics, record.gates = verdict.metrics, verdict.gates
            record.metrics["scrape_errors"] = float(len(scrape.errors))
            if verdict.decision == Decision.PASS:
                if current is not None:
                    self.reference = current
                record.decision, record.reason = "pass", verdict.reason
                return self._close(record)
            if verdict.decision == Decision.FAIL:
                record.reason = verdict.reason
                return self._close(record)
            if elapsed >= stage.max_duration_s and not verdict.enough_traffic:
                why = (
                    f"stage {stage.name}: not enough traffic to judge after "
                    f"{elapsed:.0f} s ({verdict.reason})"
                )
                if self.plan.on_insufficient_traffic == OnInsufficientTraffic.FAIL:
                    record.reason = why
                    return self._close(record)
                if not holding:
                    log.warning("%s; holding the stage (plan: hold)", why)
                    holding = True

    def _still_ours(self, record: StageRecord, canary_set: bool = True) -> bool:
        """Renew the lease; False (record aborted) if an operator ended the release.

        An operator's ``rollback``/``promote`` removes the lease, moves or removes the
        ``canary`` alias and tags the version's outcome; any of these stops the release (a
        renewal racing the lease removal cannot hide the other two).
        """
        ours = st.renew_lease(self.c, self.name, self.lease, self.plan.lease_ttl_s)
        canary = st.read_state(self.c, self.name).canary
        outcome = st.version_tags(self.c, self.name, self.version).get(st.TAG_OUTCOME)
        expected = {self.version} if canary_set else {None, self.version}
        if ours and canary in expected and outcome not in {st.ROLLED_BACK, st.PROMOTED}:
            return True
        record.decision = "aborted"
        record.reason = (
            "the release was ended from outside (e.g. `bladeflow release rollback/promote`): "
            f"canary is now {canary}, version outcome {outcome}"
        )
        return False

    def _close(self, record: StageRecord) -> StageRecord:
        record.ended_at = time.time()
        self.result.stages.append(record)
        if self.result.run_id:
            tracking.log_metrics(
                self.c,
                self.result.run_id,
                {**record.metrics, "passed": float(record.decision == "pass")},
                step=record.index,
            )
        st.record_stage(
            self.c,
            self.name,
            self.version,
            record.name,
            {
                "decision": record.decision,
                "reason": record.reason,
                "at": st.now_iso(),
                "actor": self.actor,
                "requests": record.metrics.get("canary_requests", 0.0),
            },
        )
        log.info("stage %s: %s %s", record.name, record.decision, record.reason)
        return record

    # --- approval ------------------------------------------------------------------------------

    def before_approval(self) -> None:
        """Keep the lease for the whole pause, and show the state on the version."""
        st.renew_lease(
            self.c, self.name, self.lease, self.plan.approval_timeout_s + self.plan.lease_ttl_s
        )
        st.tag_version(self.c, self.name, self.version, {st.TAG_OUTCOME: st.AWAITING_APPROVAL})

    def after_approval(self, approved: bool, approver: str, comment: str) -> str | None:
        """Record the decision; return why the release must stop, or None to go on."""
        who = approver or "an unnamed approver"
        probe = StageRecord(index=-1, name="approval", weight=0, shadow_share=0, decision="")
        still_ours = self._still_ours(probe)
        tags = {st.TAG_APPROVED_BY: f"{who}: {approved} {comment}".strip()}
        if still_ours:
            tags[st.TAG_OUTCOME] = st.IN_PROGRESS
        st.tag_version(self.c, self.name, self.version, tags)
        if not still_ours:
            return probe.reason
        if not approved:
            return f"rejected by {who}" + (f": {comment}" if comment else "")
        return None

    # --- endings -------------------------------------------------------------------------------

    def promote(self, reason: str) -> ReleaseResult:
        previous = st.promote(self.c, self.name, self.version, reason, self.actor)
        self.result.previous_champion = previous
        return self._finish("promoted", reason)

    def roll_back(self, reason: str) -> None:
        """Roll back (if this release still owns the model), record it, raise the outcome."""
        if st.holds_lease(self.c, self.name, self.lease):
            st.roll_back(self.c, self.name, self.version, reason, self.actor)
        self._finish("rolled_back", reason)
        raise ReleaseRolledBackError(
            f"release of {self.name} version {self.version} rolled back: {reason}",
            reason,
            self.result.run_id,
        )

    def aborted(self, reason: str) -> ReleaseResult:
        """An operator ended the release: keep their decision, even against a racing step."""
        state = st.read_state(self.c, self.name)
        outcome = st.version_tags(self.c, self.name, self.version).get(st.TAG_OUTCOME)
        if state.canary == self.version != state.champion and outcome == st.ROLLED_BACK:
            st.clear_traffic(self.c, self.name)  # our set_traffic raced their rollback
        return self._finish("aborted", reason)

    def _finish(self, outcome: str, reason: str) -> ReleaseResult:
        state = st.read_state(self.c, self.name)
        self.result.outcome, self.result.reason = outcome, reason
        self.result.champion = state.champion
        if self.result.run_id:
            status = "FINISHED" if outcome == "promoted" else "FAILED"
            tracking.end_run(
                self.c,
                self.result.run_id,
                status,
                {"bladeflow.release.outcome": outcome, "bladeflow.release.reason": reason},
            )
        st.drop_lease(self.c, self.name, self.lease)
        self.scraper.close()
        return self.result
