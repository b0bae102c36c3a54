"""Every command with a password in --tracking-uri: the password reaches no output, no Prefect
flow-run parameter, no MLflow param or tag and no file. Real MLflow server, real Prefect (the
temporary server under the home), real CLI processes."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tests.reliability.pipeline_helpers import mlflow_server, mlp_source, run_cli

SECRET = "pw-s3cr3t-%40-5e7a"  # percent-encoded '@': decoded before use, never stored either way
DECODED = "pw-s3cr3t-@-5e7a"
FAST = ["--bench-rounds", "2", "--bench-iterations", "3", "-b", "1", "--passes", "ort_graph"]


def _has(text: str) -> bool:
    return SECRET in text or DECODED in text


def _scan(paths: list[Path], texts: dict[str, str]) -> list[str]:
    found = [
        f"{where} has it" for where, text in texts.items() if SECRET in text or DECODED in text
    ]
    for folder in paths:
        for f in folder.rglob("*"):
            if f.is_file() and f.stat().st_size < 200 << 20:
                blob = f.read_bytes()
                if SECRET.encode() in blob or DECODED.encode() in blob:
                    found.append(f"file {f} has it")
    return found


def test_no_command_leaks_a_tracking_uri_password(scenario, tmp_path: Path):
    s = scenario(
        "a password in --tracking-uri for every command",
        fault="optimize, release start/status/promote/rollback and serve with "
        "--tracking-uri http://alice:<pw>@host (a live MLflow), and release start against a dead "
        "one",
        expected="the password in no output, Prefect parameter, MLflow param/tag or file; a dead "
        "server is exit 4 within seconds",
    )
    # setup: a real MLflow server (no auth: it ignores the credentials, as a proxy would check)
    src, data = mlp_source(tmp_path / "src")
    srv = mlflow_server(tmp_path / "mlflow")
    home = tmp_path / "home"
    uri = f"http://alice:{SECRET}@{srv.url.removeprefix('http://')}"
    outputs: dict[str, str] = {}
    try:
        # execute: every command that takes --tracking-uri
        commands = {
            "optimize": ["optimize", str(src), "-n", "mlp", "--data", str(data), *FAST],
            "release status": ["release", "status", "mlp"],
            "release start": ["release", "start", "mlp", "99", "--plan", "fast"],
            "release promote": ["release", "promote", "mlp"],
            "release rollback": ["release", "rollback", "mlp"],
            "serve": ["serve", "--model", "nobody", "--port", "1"],
        }
        codes = {}
        for label, args in commands.items():
            out = run_cli([*args, "--tracking-uri", uri], home, timeout=300)
            codes[label] = out.returncode
            outputs[label] = out.stdout + out.stderr
        started = time.monotonic()
        dead = run_cli(
            ["release", "start", "mlp", "1", "--tracking-uri", f"http://bob:{SECRET}@127.0.0.1:9/"],
            home,
            timeout=120,
        )
        dead_s = time.monotonic() - started
        outputs["release start (dead MLflow)"] = dead.stdout + dead.stderr
        # assert: what each command did
        assert codes["optimize"] == 0, outputs["optimize"][-3000:]
        assert codes["release status"] == 0, outputs["release status"][-2000:]
        assert codes["release start"] == 2, outputs["release start"][-2000:]
        assert dead.returncode == 4 and dead_s < 30, (
            dead_s,
            outputs["release start (dead MLflow)"],
        )
        # assert: nothing recorded anywhere has the password
        from tests.reliability.pipeline_helpers import client

        c = client(srv.url)
        mv = c.get_model_version("mlp", "1")
        run = c.get_run(mv.run_id)
        recorded = " ".join([*run.data.params.values(), *run.data.tags.values(), *mv.tags.values()])
        params_text = ""
        for db in (home / "prefect").rglob("*.db"):
            with sqlite3.connect(db) as conn:
                params_text += " ".join(
                    str(r[0]) for r in conn.execute("select parameters from flow_run")
                )
        assert "tracking_uri" in params_text  # flow runs were recorded, and searched
        found = _scan(
            [home, tmp_path / "mlflow"],
            {**outputs, "MLflow run/version": recorded, "Prefect parameters": params_text},
        )
        s.observe(
            f"exit codes {codes}, dead server exit {dead.returncode} in {dead_s:.1f} s; searched "
            f"{len(outputs)} outputs, {len(run.data.params)} params, "
            f"{len(run.data.tags) + len(mv.tags)} tags, Prefect parameters and every file: "
            f"{found or 'no password found'}"
        )
        assert found == []
    finally:
        srv.stop(grace_s=5)
