"""The release flow against a real MLflow registry (SQLite) and real Prefect (test harness).

Serving is the simulated fleet of ``sim.py`` (real metric objects, registry-following routing),
so stages take about a second; ``test_release_e2e.py`` runs the real server.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from bladeflow.app import release_cli
from bladeflow.core import registry
from bladeflow.core.release_plan import OnInsufficientTraffic, StagePlan
from bladeflow.core.settings import Settings
from bladeflow.flows.release import release_flow
from bladeflow.tasks.release import engine
from bladeflow.tasks.release import state as st
from bladeflow.tasks.release.errors import (
    NotValidatedError,
    ReleaseConflictError,
    ReleaseRolledBackError,
)
from tests.release.conftest import Background, quick_plan
from tests.release.sim import Profile, SimServing

pytestmark = pytest.mark.usefixtures("prefect_harness")


def params(name: str, version: str, url: str, **kw: Any) -> engine.ReleaseParams:
    kw.setdefault("plan", quick_plan())
    return engine.ReleaseParams(name=name, version=version, endpoints=[url], actor="tester", **kw)


def wait_for(predicate: Any, timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def cli_app() -> typer.Typer:
    app = typer.Typer()
    for fn in (release_cli.start, release_cli.status, release_cli.promote, release_cli.rollback):
        app.command()(fn)
    return app


def test_first_release_becomes_champion_directly(settings: Settings, client, add_version):
    # setup
    v1 = add_version("first")
    # execute
    result = release_flow(params("first", v1, "http://127.0.0.1:9"))
    # assert
    s = st.read_state(client, "first")
    assert result.outcome == "promoted" and "first release" in result.reason
    assert s.champion == v1 and s.canary is None and s.lease is None and s.weight == 0
    assert client.get_model_version("first", v1).tags[st.TAG_OUTCOME] == st.PROMOTED
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_unvalidated_version_is_refused_and_nothing_changes(settings, client, add_version):
    # setup
    v1 = add_version("unval", alias="champion")
    v2 = add_version("unval", validated=False)
    # execute
    with pytest.raises(NotValidatedError, match=r"not tagged bladeflow\.validated=true"):
        release_flow(params("unval", v2, "http://127.0.0.1:9"))
    # assert
    s = st.read_state(client, "unval")
    assert (s.champion, s.canary, s.lease) == (v1, None, None)


def test_good_version_goes_through_every_stage_to_champion(settings, client, add_version):
    # setup
    v1 = add_version("good", alias="champion")
    v2 = add_version("good")
    # execute
    with SimServing(settings, "good", {v2: Profile()}) as sim:
        result = release_flow(params("good", v2, sim.url))
    # assert: outcome and stages
    assert result.outcome == "promoted", result.reason
    assert [s.name for s in result.stages] == [
        "shadow",
        "canary-5",
        "canary-25",
        "canary-50",
        "full",
    ]
    assert all(s.decision == "pass" for s in result.stages)
    assert all(s.metrics["canary_requests"] >= 20 for s in result.stages)
    # assert: the registry
    s = st.read_state(client, "good")
    assert (s.champion, s.canary, s.weight, s.shadow_share, s.lease) == (v2, None, 0, 0, None)
    assert s.previous_champion == v1
    tags = client.get_model_version("good", v2).tags
    assert tags[st.TAG_OUTCOME] == st.PROMOTED and tags[st.TAG_ACTOR] == "tester"
    assert json.loads(tags[st.TAG_STAGE_PREFIX + "canary-25"])["decision"] == "pass"
    # assert: the MLflow release run
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["plan.stages.1.weight"] == "5"
    history = client.get_metric_history(result.run_id, "weight")
    assert sorted(int(m.value) for m in history) == [0, 5, 25, 50, 100]
    assert {m.step for m in client.get_metric_history(result.run_id, "canary_error_rate")} == {
        0,
        1,
        2,
        3,
        4,
    }


@pytest.mark.parametrize(
    ("profile", "reason"),
    [
        (Profile(error_share=0.3), "5xx share"),
        (Profile(latency_s=0.08), "p99"),
        (Profile(agree_share=0.5), "shadow agreement"),
    ],
    ids=["errors", "slow", "disagrees"],
)
def test_bad_version_is_rolled_back_at_the_shadow_stage(
    settings, client, add_version, profile, reason
):
    # setup
    name = f"bad-{reason.split()[0]}"
    v1 = add_version(name, alias="champion")
    v2 = add_version(name)
    # execute
    with SimServing(settings, name, {v2: profile}) as sim:
        with pytest.raises(ReleaseRolledBackError) as info:
            release_flow(params(name, v2, sim.url))
        served = dict(sim.served)
    # assert
    assert "stage shadow" in info.value.reason and reason in info.value.reason
    s = st.read_state(client, name)
    assert (s.champion, s.canary, s.weight, s.lease) == (v1, None, 0, None)
    tags = client.get_model_version(name, v2).tags
    assert tags[st.TAG_OUTCOME] == st.ROLLED_BACK and reason in tags[st.TAG_REASON]
    assert served.get(v2, 0) == 0  # shadow only: every response came from the champion
    assert client.get_run(info.value.run_id).data.tags["bladeflow.release.outcome"] == "rolled_back"


def test_second_release_is_refused_while_one_runs(settings, client, add_version):
    # setup: a release that holds at its first stage (no traffic at all)
    add_version("busy", alias="champion")
    v2, v3 = add_version("busy"), add_version("busy")
    plan = quick_plan(on_insufficient_traffic=OnInsufficientTraffic.HOLD)
    with SimServing(settings, "busy", rps=0) as sim:
        first = Background(lambda: release_flow(params("busy", v2, sim.url, plan=plan)))
        wait_for(lambda: st.read_state(client, "busy").canary == v2, what="first release")
        # execute
        with pytest.raises(ReleaseConflictError) as info:
            release_flow(params("busy", v3, sim.url))
        # cleanup through the CLI: the operator stops the first release
        out = CliRunner().invoke(cli_app(), ["rollback", "busy", "--actor", "ops"])
        first.join(180)  # a loaded machine can take a while to notice
    # assert
    assert "already in progress" in str(info.value) and "tester@" in str(info.value)
    assert out.exit_code == 0 and "rolled back the release of version 2" in out.output
    assert isinstance(first.error, ReleaseRolledBackError) and "from outside" in first.error.reason
    s = st.read_state(client, "busy")
    assert (s.canary, s.lease, s.weight) == (None, None, 0)
    assert client.get_model_version("busy", v3).tags.get(st.TAG_OUTCOME) is None


def test_rollback_restores_the_previous_champion(settings, client, add_version):
    # setup: v2 replaced v1 by a release
    v1 = add_version("rb", alias="champion")
    v2 = add_version("rb")
    with SimServing(settings, "rb") as sim:
        release_flow(params("rb", v2, sim.url, plan=quick_plan(seconds=0.3, requests=5)))
    assert st.read_state(client, "rb").champion == v2
    # execute
    out = CliRunner().invoke(cli_app(), ["rollback", "rb", "--actor", "ops"])
    # assert
    assert out.exit_code == 0, out.output
    s = st.read_state(client, "rb")
    assert (s.champion, s.previous_champion, s.canary) == (v1, v2, None)
    assert client.get_model_version("rb", v2).tags[st.TAG_OUTCOME] == st.ROLLED_BACK


def _crash_at(client: Any, name: str, version: str, index: int, weight: int) -> None:
    """Leave the registry exactly as a release process killed during stage ``index`` does."""
    st.set_traffic(client, name, version, weight, 0)
    st.tag_version(
        client,
        name,
        version,
        {st.TAG_OUTCOME: st.IN_PROGRESS, st.TAG_STAGE_INDEX: str(index), st.TAG_STAGE: "x"},
    )
    dead = st.Lease(holder="dead@host pid 1", version=version, expires=time.time() - 1)
    client.set_registered_model_tag(name, st.MODEL_TAG_LEASE, dead.to_json())


def test_release_killed_mid_stage_is_resumed_by_a_rerun(settings, client, add_version):
    # setup
    v1 = add_version("crash", alias="champion")
    v2 = add_version("crash")
    _crash_at(client, "crash", v2, index=2, weight=25)
    status = CliRunner().invoke(cli_app(), ["status", "crash", "--json"])
    # execute
    with SimServing(settings, "crash") as sim:
        result = release_flow(params("crash", v2, sim.url))
    # assert
    assert json.loads(status.output)["state"] == "interrupted"
    assert result.outcome == "promoted" and result.resumed_at_stage == 2
    assert [s.name for s in result.stages] == ["canary-25", "canary-50", "full"]
    s = st.read_state(client, "crash")
    assert (s.champion, s.previous_champion, s.canary, s.lease) == (v2, v1, None, None)


def test_other_version_after_a_crash_rolls_the_dead_release_back_first(
    settings, client, add_version
):
    # setup
    v1 = add_version("crash2", alias="champion")
    v2, v3 = add_version("crash2"), add_version("crash2")
    _crash_at(client, "crash2", v2, index=1, weight=5)
    # execute
    with SimServing(settings, "crash2") as sim:
        result = release_flow(params("crash2", v3, sim.url))
    # assert
    assert result.outcome == "promoted" and len(result.stages) == 5
    assert client.get_model_version("crash2", v2).tags[st.TAG_OUTCOME] == st.ROLLED_BACK
    assert "abandoned" in client.get_model_version("crash2", v2).tags[st.TAG_REASON]
    assert st.read_state(client, "crash2").champion == v3 != v1


def test_live_lease_of_a_running_release_is_not_taken_over(settings, client, add_version):
    add_version("live", alias="champion")
    v2 = add_version("live")
    live = st.Lease(holder="alice@box pid 7", version=v2, expires=time.time() + 600)
    client.set_registered_model_tag("live", st.MODEL_TAG_LEASE, live.to_json())
    with pytest.raises(ReleaseConflictError, match="alice@box pid 7"):
        release_flow(params("live", v2, "http://127.0.0.1:9"))
    assert st.read_state(client, "live").lease.holder == "alice@box pid 7"


@pytest.mark.parametrize("approve", [True, False], ids=["approved", "rejected"])
def test_approval_pauses_before_the_last_stage(settings, client, add_version, approve):
    from prefect.flow_runs import resume_flow_run

    # setup
    name = f"appr-{approve}"
    add_version(name, alias="champion")
    v2 = add_version(name)
    stages = [
        StagePlan(
            name=n, weight=w, shadow_share=sh, min_duration_s=0.3, max_duration_s=5, min_requests=5
        )
        for n, w, sh in (("shadow", 0, 100), ("full", 100, 0))
    ]
    plan = quick_plan(stages=stages)
    with SimServing(settings, name) as sim:
        run = Background(lambda: release_flow(params(name, v2, sim.url, plan=plan, approval=True)))
        wait_for(
            lambda: (
                client.get_model_version(name, v2).tags.get(st.TAG_OUTCOME) == st.AWAITING_APPROVAL
            ),
            what="the approval pause",
        )
        flow_run_id = st.read_state(client, name).lease.flow_run_id
        # execute
        wait_for(lambda: _resume(resume_flow_run, flow_run_id, approve), what="a paused run")
        run.join(60)
    # assert
    tags = client.get_model_version(name, v2).tags
    assert tags[st.TAG_APPROVED_BY].startswith(f"carol: {approve}")
    s = st.read_state(client, name)
    if approve:
        assert run.error is None and run.result.outcome == "promoted"
        assert s.champion == v2
    else:
        assert isinstance(run.error, ReleaseRolledBackError) and "rejected by carol" in str(
            run.error
        )
        assert s.champion != v2 and s.canary is None and s.weight == 0
    assert s.lease is None


def _resume(resume: Any, flow_run_id: str, approve: bool) -> bool:
    from uuid import UUID

    from prefect.exceptions import NotPausedError

    try:
        resume(UUID(flow_run_id), run_input={"approve": approve, "approver": "carol"})
    except NotPausedError:
        return False
    return True


def test_model_tags_are_the_documented_registry_schema():
    assert registry.MODEL_TAG_CANARY_WEIGHT == "bladeflow.canary_weight"
    assert st.MODEL_TAG_SHADOW_SHARE == "bladeflow.shadow_share"
    assert st.MODEL_TAG_LEASE == "bladeflow.release.lease"
    assert st.MODEL_TAG_PREVIOUS_CHAMPION == "bladeflow.previous_champion"


KILLABLE = """
import sys
from bladeflow.core.settings import Settings
from bladeflow.core.params import ReleaseParams
from bladeflow.tasks.release.engine import Releaser
params = ReleaseParams.model_validate_json(sys.argv[1])
r = Releaser(params, Settings.from_env())
begin = r.begin()
for index in range(begin.start_index, len(params.plan.stages)):
    print(r.run_stage(index).decision, flush=True)
"""


@pytest.mark.slow  # a fresh interpreter importing MLflow, and a lease to expire: ~1 min
def test_release_process_killed_mid_stage_then_rerun_ends_consistent(settings, client, add_version):
    import signal
    import subprocess
    import sys

    # setup: a release process that passes shadow, then sits in canary-5 (long minimum)
    v1 = add_version("kill", alias="champion")
    v2 = add_version("kill")
    plan = quick_plan()
    plan.stages[1] = plan.stages[1].model_copy(
        update={"min_duration_s": 300, "max_duration_s": 600}
    )
    with SimServing(settings, "kill") as sim:
        p = params("kill", v2, sim.url, plan=plan)
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, p.model_dump_json()])
        try:
            wait_for(
                lambda: st.read_state(client, "kill").weight == 5,
                timeout=120,
                what="stage canary-5",
            )
        finally:
            # execute: kill it hard (no cleanup can run)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        left = st.read_state(client, "kill")
        wait_for(lambda: st.read_state(client, "kill").lease.expired(), what="lease expiry")
        result = release_flow(params("kill", v2, sim.url))
    # assert: the kill left a canary at 5% and a lease; the rerun resumed at canary-5
    assert (left.canary, left.weight, left.lease is not None) == (v2, 5, True)
    assert result.outcome == "promoted" and result.resumed_at_stage == 1
    assert [s.name for s in result.stages] == ["canary-5", "canary-25", "canary-50", "full"]
    s = st.read_state(client, "kill")
    assert (s.champion, s.previous_champion, s.canary, s.lease) == (v2, v1, None, None)
    assert s.weight == 0


def test_cli_start_reports_outcomes_with_exit_codes(settings, client, add_version, tmp_path):
    # setup
    v1 = add_version("cli")
    v2 = add_version("cli", validated=False)
    plan = tmp_path / "plan.json"
    plan.write_text(quick_plan().model_dump_json())
    app = cli_app()
    # execute
    first = CliRunner().invoke(app, ["start", "cli", v1, "--plan", str(plan), "--json"])
    refused = CliRunner().invoke(app, ["start", "cli", v2, "--plan", "fast"])
    nothing = CliRunner().invoke(app, ["promote", "cli"])
    # assert
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout[first.stdout.index("{") :])["outcome"] == "promoted"
    assert refused.exit_code == 2 and "not tagged bladeflow.validated=true" in refused.output
    assert nothing.exit_code == 2 and "no release in progress" in nothing.output
    assert st.read_state(client, "cli").champion == v1
