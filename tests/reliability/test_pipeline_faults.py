"""The optimize pipeline under faults: killed mid-stage, MLflow or S3 gone mid-run, two runs at
once, and credentials that must not end up in what it records.

Every run here is the real ``bladeflow optimize`` process against real servers (MLflow, Prefect,
SeaweedFS S3). Kill points come from ``BLADEFLOW_FAULT_PAUSE_AT`` (bladeflow/faults.py): the
process announces the point on stderr and waits there, and the test SIGKILLs its process group.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bladeflow.app import stack_proc
from tests.reliability.pipeline_helpers import (
    FAST,
    S3_KEYS,
    invariant_problems,
    mlflow_server,
    mlp_source,
    model_loads,
    prefect_server,
    registry_state,
    run_cli,
    s3_server,
    sqlite_uri,
    start_cli,
)

KILL_POINTS = [
    "convert",
    "optimize",
    "validate",
    "benchmark",
    "register",
    "register.model_logged",
    "register.version_created",
    "register.validated",
    "register.alias_set",
]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the module's CLI runs (each would start its own otherwise)."""
    srv = prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield srv.url
    finally:
        srv.stop(grace_s=5)


def _optimize_args(src: Path, data: Path, name: str) -> list[str]:
    return ["optimize", str(src), "--name", name, "--data", str(data), *FAST]


def _flow_runs_by_state(api: str) -> dict[str, int]:
    runs = requests.post(f"{api}/flow_runs/filter", json={"limit": 200}, timeout=30).json()
    out: dict[str, int] = {}
    for r in runs:
        state = (r.get("state") or {}).get("type", "?")
        out[state] = out.get(state, 0) + 1
    return out


@pytest.mark.slow
def test_sigkill_at_every_stage_keeps_the_registry_consistent_and_a_rerun_succeeds(
    scenario, tmp_path: Path, prefect_api: str
):
    # setup: one model, one registry; the flow runs against a real Prefect server
    src, data = mlp_source(tmp_path / "src")
    home = tmp_path / "home"
    uri = sqlite_uri(home)
    extra = {"PREFECT_API_URL": prefect_api}
    killed_rows = []
    for point in KILL_POINTS:
        s = scenario(
            f"optimize SIGKILLed at {point}",
            fault=f"SIGKILL of the CLI's process group when the flow reaches {point!r}",
            expected="no alias on an unvalidated/non-READY version; the next run is not blocked",
        )
        # execute: run until the point, then kill -9 the whole process group
        proc = start_cli(
            _optimize_args(src, data, "mlp"),
            home,
            {**extra, "BLADEFLOW_FAULT_PAUSE_AT": point},
            tag=f"kill-{point}",
        )
        reached = proc.wait_for(rf"bladeflow-fault: paused at {re.escape(point)} ", 240)
        proc.kill()
        # assert: the registry keeps its promises right after the kill
        state = registry_state(uri, "mlp")
        s.observe(f"killed {reached:.0f} s after start; then {state.describe()}")
        assert invariant_problems(state) == [], state.describe()
        killed_rows.append(s)

    # execute: a normal run after all those kills
    s = scenario(
        "optimize re-run after 9 SIGKILLs",
        fault="9 earlier runs of the same model SIGKILLed at every stage and registry step",
        expected="exit 0, a new validated READY version with alias candidate that loads; runs the "
        "killed processes left RUNNING marked KILLED; unfinished versions deleted",
    )
    before = registry_state(uri, "mlp")
    started = time.monotonic()
    out = run_cli(_optimize_args(src, data, "mlp"), home, extra)
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    after = registry_state(uri, "mlp")
    new = after.aliases.get("candidate")
    s.observe(f"before: {before.describe()}")
    s.observe(f"re-run exit {out.returncode} in {took:.0f} s; after: {after.describe()}")
    # assert: the re-run registered a good version
    assert new is not None and new not in before.versions
    assert after.versions[new]["validated"] == "true" and after.versions[new]["status"] == "READY"
    assert model_loads(uri, "mlp", new)
    assert invariant_problems(after) == []
    # assert: nothing RUNNING is left from the killed processes (the re-run's own run FINISHED)
    assert "RUNNING" not in after.runs.values(), after.runs
    killed = sorted(r for r, st in after.runs.items() if st == "KILLED")
    assert len(killed) == 8  # every kill after start-mlflow-run (all but "convert")
    # assert: every version left is finished (validated, READY); none without the tag survives
    unfinished = [v for v, d in after.versions.items() if d["validated"] != "true"]
    assert unfinished == [], after.describe()
    leftovers = len(list((home / "work").iterdir()))
    prefect_states = _flow_runs_by_state(prefect_api)
    s.observe(
        f"{len(killed)} stale runs marked KILLED; {leftovers} run folders left in work/ (not "
        f"blocking); Prefect flow runs by state {prefect_states} (killed ones stay RUNNING in "
        "Prefect until its zombie detection marks them)"
    )


def test_mlflow_down_at_start_exits_4_within_seconds(scenario, tmp_path: Path):
    s = scenario(
        "MLflow tracking server down at start",
        fault="--tracking-uri points at a port nothing listens on",
        expected="exit 4 with a one-paragraph message naming the server, within ~10 s, no "
        "traceback, no Prefect start",
    )
    # setup
    src, data = mlp_source(tmp_path / "src")
    dead = f"http://127.0.0.1:{stack_proc.free_port()}"
    # execute
    started = time.monotonic()
    out = run_cli([*_optimize_args(src, data, "mlp"), "--tracking-uri", dead], tmp_path / "home")
    took = time.monotonic() - started
    s.observe(f"exit {out.returncode} after {took:.1f} s: {out.stderr.strip()[-200:]}")
    # assert
    assert out.returncode == 4, out.stderr[-2000:]
    assert f"cannot use MLflow at {dead}" in out.stderr and "server is running" in out.stderr
    assert "Traceback" not in out.stderr
    assert "Starting temporary server" not in out.stderr  # refused before Prefect started
    assert took < 30


@pytest.mark.slow
def test_mlflow_server_stopped_mid_run_fails_clearly_and_leaves_nothing_half_registered(
    scenario, tmp_path: Path, prefect_api: str
):
    s = scenario(
        "MLflow server stopped mid-run",
        fault="the real `mlflow server` is stopped while the flow is in its benchmark stage "
        "(after the MLflow run started); restarted afterwards",
        expected="bounded retries, exit 4 with a clear message, no traceback; with the server "
        "back: no version, no alias, and the next run succeeds",
    )
    # setup: a real tracking server; the flow pauses 20 s at the benchmark stage
    src, data = mlp_source(tmp_path / "src")
    srv = mlflow_server(tmp_path / "mlflow")
    try:
        args = [*_optimize_args(src, data, "mlp"), "--tracking-uri", srv.url]
        extra = {
            "PREFECT_API_URL": prefect_api,
            "BLADEFLOW_FAULT_PAUSE_AT": "benchmark",
            "BLADEFLOW_FAULT_PAUSE_S": "20",
        }
        proc = start_cli(args, tmp_path / "home", extra, tag="mlflow-down")
        proc.wait_for(r"bladeflow-fault: paused at benchmark ", 240)
        # execute: stop the server under the running flow
        srv.stop(grace_s=5)
        stopped = time.monotonic()
        rc = proc.finish(timeout=400)
        took = time.monotonic() - stopped
        err = proc.text()
        s.observe(f"exit {rc} {took:.0f} s after the server stopped (incl. up to 20 s pause)")
        # assert: a clear failure, in bounded time
        assert rc == 4, err[-3000:]
        assert "bladeflow: error:" in err and "did not answer" in err, err[-3000:]
        assert "Traceback" not in err.split("bladeflow-fault: resumed")[-1], err[-3000:]
        assert took < 200
        # assert: with the server back, nothing is half-registered
        srv.start()
        state = registry_state(srv.url, "mlp")
        s.observe(f"server back: {state.describe()}")
        assert state.versions == {} and state.aliases == {}
        # execute: the next run succeeds (and closes the run the failed one left open)
        out = run_cli(args, tmp_path / "home", {"PREFECT_API_URL": prefect_api})
        assert out.returncode == 0, out.stderr[-3000:]
        state = registry_state(srv.url, "mlp")
        s.observe(f"re-run exit 0: {state.describe()}")
        assert state.aliases == {"candidate": "1"} and invariant_problems(state) == []
        assert "RUNNING" not in state.runs.values()
    finally:
        srv.stop(grace_s=5)


@pytest.mark.slow
def test_s3_stopped_while_logging_artifacts_registers_nothing(
    scenario, tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
):
    s = scenario(
        "S3 artifact store stopped mid-run",
        fault="SeaweedFS (the artifact store) is SIGKILLed just before the model is uploaded; "
        "restarted afterwards",
        expected="bounded retries, exit 4 naming the artifact store, no version without its "
        "artifacts, no alias moved; the next run registers a version that loads",
    )
    # setup: v1 registered normally with artifacts in S3; the tracking store is local SQLite
    src, data = mlp_source(tmp_path / "src")
    srv = s3_server(tmp_path / "s3")
    home = tmp_path / "home"
    uri = sqlite_uri(home)
    extra = {
        **S3_KEYS,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": srv.url,
        "BLADEFLOW_ARTIFACT_ROOT": f"s3://{srv.cfg.bucket}/artifacts",
        "PREFECT_API_URL": prefect_api,
    }
    try:
        first = run_cli(_optimize_args(src, data, "mlp"), home, extra)
        assert first.returncode == 0, first.stderr[-3000:]
        # execute: pause at the register stage, kill S3 there, let the flow go on
        proc = start_cli(
            _optimize_args(src, data, "mlp"),
            home,
            {**extra, "BLADEFLOW_FAULT_PAUSE_AT": "register", "BLADEFLOW_FAULT_PAUSE_S": "8"},
            tag="s3-down",
        )
        proc.wait_for(r"bladeflow-fault: paused at register ", 240)
        srv.stop(grace_s=0.1)
        stopped = time.monotonic()
        rc = proc.finish(timeout=400)
        took = time.monotonic() - stopped
        err = proc.text()
        s.observe(f"exit {rc} {took:.0f} s after S3 went down (incl. up to 8 s pause)")
        # assert
        assert rc == 4, err[-3000:]
        assert "logging the model failed" in err and "artifact store" in err, err[-3000:]
        assert "Traceback" not in err.split("bladeflow-fault: resumed")[-1], err[-3000:]
        assert took < 200
        state = registry_state(uri, "mlp")
        s.observe(f"after: {state.describe()}")
        assert list(state.versions) == ["1"] and state.aliases == {"candidate": "1"}
        # execute: S3 back, run again
        srv.start()
        out = run_cli(_optimize_args(src, data, "mlp"), home, extra)
        assert out.returncode == 0, out.stderr[-3000:]
        state = registry_state(uri, "mlp")
        s.observe(f"S3 back, re-run exit 0: {state.describe()}")
        assert state.aliases == {"candidate": "2"} and invariant_problems(state) == []
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.setenv(key, extra[key])  # this process downloads the model from S3
        assert model_loads(uri, "mlp", "2")
    finally:
        srv.stop(grace_s=0.1)


@pytest.mark.slow
def test_two_runs_of_one_model_at_once_register_two_consistent_versions(scenario, tmp_path: Path):
    s = scenario(
        "two optimize runs of one model at once",
        fault="two `bladeflow optimize` processes of the same model started together, one "
        "SQLite registry, each with its own temporary Prefect server",
        expected="both exit 0; two distinct versions, each READY, validated, with its own run "
        "and model artifacts; alias candidate on one of them",
    )
    # setup
    src, data = mlp_source(tmp_path / "src")
    home = tmp_path / "home"
    uri = sqlite_uri(home)
    # execute
    procs = [
        start_cli(_optimize_args(src, data, "mlp"), home, tag=f"concurrent-{i}") for i in (1, 2)
    ]
    started = time.monotonic()
    codes = [p.finish(timeout=500) for p in procs]
    took = time.monotonic() - started
    # assert
    state = registry_state(uri, "mlp")
    s.observe(f"exit codes {codes} after {took:.0f} s; {state.describe()}")
    assert codes == [0, 0], [p.text()[-2000:] for p in procs]
    assert sorted(state.versions) == ["1", "2"]
    runs = {d["run_id"] for d in state.versions.values()}
    sources = {d["source"] for d in state.versions.values()}
    assert len(runs) == 2 and len(sources) == 2
    assert invariant_problems(state) == []
    assert state.aliases["candidate"] in state.versions
    for v, d in state.versions.items():
        assert d["tags"]["bladeflow.candidate"] and d["tags"]["bladeflow.recipe"]
        assert model_loads(uri, "mlp", v)
    assert set(state.runs.values()) == {"FINISHED"}


SECRET_PW = "pw-s3cr3t-7c1e"
SECRET_AWS = "aws-s3cr3t-99af"
SECRET_TOKEN = "tok-s3cr3t-42bd"


@pytest.mark.slow
def test_secrets_stay_out_of_logs_mlflow_and_prefect(scenario, tmp_path: Path):
    s = scenario(
        "credentials in the tracking URI and the environment",
        fault=f"--tracking-uri http://user:{SECRET_PW}@host:port, AWS_SECRET_ACCESS_KEY and "
        "BLADEFLOW_SERVE_TOKEN set",
        expected="registered; none of the three secrets in CLI output, MLflow params/tags/"
        "artifacts, the Prefect database (flow-run parameters, logs) or any file under the home",
    )
    # setup: a real MLflow server (no auth: it ignores the credentials, as a proxy would check)
    src, data = mlp_source(tmp_path / "src")
    srv = mlflow_server(tmp_path / "mlflow")
    home = tmp_path / "home"
    host = srv.url.removeprefix("http://")
    extra = {"AWS_SECRET_ACCESS_KEY": SECRET_AWS, "BLADEFLOW_SERVE_TOKEN": SECRET_TOKEN}
    try:
        # execute
        out = run_cli(
            [
                *_optimize_args(src, data, "mlp"),
                "--tracking-uri",
                f"http://alice:{SECRET_PW}@{host}",
                "--json",
            ],
            home,
            extra,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        # assert: the CLI output
        secrets = (SECRET_PW, SECRET_AWS, SECRET_TOKEN)
        found = [f"CLI output has {x}" for x in secrets if x in out.stdout + out.stderr]
        # assert: the registered run's params and tags, the version's tags
        from tests.reliability.pipeline_helpers import client

        c = client(srv.url)
        mv = c.get_model_version("mlp", "1")
        run = c.get_run(mv.run_id)
        recorded = " ".join([*run.data.params.values(), *run.data.tags.values(), *mv.tags.values()])
        found += [f"MLflow run/version has {x}" for x in secrets if x in recorded]
        # assert: the Prefect flow run's parameters (temporary server's SQLite under the home)
        dbs = list((home / "prefect").rglob("*.db"))
        assert dbs, "no Prefect database under the home"
        params_text = ""
        for db in dbs:
            with sqlite3.connect(db) as conn:
                params_text += " ".join(
                    str(row[0]) for row in conn.execute("select parameters from flow_run")
                )
        assert "mlp.onnx" in params_text  # the parameters are there, and were searched
        found += [f"Prefect flow-run parameters have {x}" for x in secrets if x in params_text]
        # assert: every file either side wrote (MLflow server DB, artifacts, Prefect DB, work/)
        for folder in (home, tmp_path / "mlflow"):
            for f in folder.rglob("*"):
                if f.is_file() and f.stat().st_size < 200 << 20:
                    blob = f.read_bytes()
                    found += [f"{f.name} has {x}" for x in secrets if x.encode() in blob]
        s.observe(
            f"exit {out.returncode}; searched CLI output, {len(run.data.params)} params, "
            f"{len(run.data.tags) + len(mv.tags)} tags, Prefect flow-run parameters and every "
            f"file under both homes: {found or 'no secret found'}"
        )
        assert found == []
        assert f"http://alice:***@{host}" in out.stderr or host in out.stderr
    finally:
        srv.stop(grace_s=5)


def test_credentials_in_flow_parameters_are_refused(scenario):
    s = scenario(
        "password in the optimize flow's tracking_uri parameter",
        fault="OptimizeParams(tracking_uri='http://u:pw@host') (a deployment run's form)",
        expected="refused: Prefect would store and show it; the message is masked and says "
        "to use MLFLOW_TRACKING_USERNAME/PASSWORD",
    )
    from pydantic import ValidationError

    from bladeflow.core.params import OptimizeParams

    with pytest.raises(ValidationError) as info:
        OptimizeParams(source="m.onnx", name="m", tracking_uri=f"http://u:{SECRET_PW}@h:5000")
    # what the CLI and the flow report (pydantic's own repr also echoes the input value)
    text = "; ".join(e["msg"] for e in info.value.errors(include_input=False))
    s.observe(text[:200])
    assert SECRET_PW not in text and "MLFLOW_TRACKING_PASSWORD" in text and "u:***@h" in text
