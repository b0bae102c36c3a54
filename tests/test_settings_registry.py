from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bladeflow.core import registry
from bladeflow.core.contract import PassRecord, SessionConfig
from bladeflow.core.errors import UserInputError
from bladeflow.core.settings import Settings


def test_defaults_live_under_dot_bladeflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # setup
    monkeypatch.chdir(tmp_path)
    # execute
    s = Settings.from_env(environ={})
    # assert
    assert s.home == tmp_path / ".bladeflow"
    assert s.tracking_uri == f"sqlite:///{tmp_path / '.bladeflow' / 'mlflow.db'}"
    assert s.registry_uri == s.tracking_uri
    assert s.artifact_root == (tmp_path / ".bladeflow" / "artifacts").as_uri()
    assert s.prefect_home == tmp_path / ".bladeflow" / "prefect"
    env = s.environment()
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_environment_and_flags_override(tmp_path: Path):
    s = Settings.from_env(
        environ={
            "BLADEFLOW_HOME": str(tmp_path / "h"),
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        }
    )
    assert s.home == tmp_path / "h"
    assert s.tracking_uri == "http://127.0.0.1:5000"
    flagged = s.with_tracking_uri("sqlite:///x.db")
    assert flagged.tracking_uri == flagged.registry_uri == "sqlite:///x.db"


@pytest.mark.parametrize("name", ["intent", "bert-matcher_v2", "asr.encoder", "A1"])
def test_model_names_accepted(name: str):
    assert registry.check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "models:x", "-lead", "sp ace", "x" * 200])
def test_model_names_refused_with_advice(name: str):
    with pytest.raises(UserInputError, match="letters, digits"):
        registry.check_model_name(name)


def test_recipe_round_trips_runtime_config():
    session = SessionConfig(
        graph_optimization_level="disable", intra_op_num_threads=2, allow_spinning=False
    )
    text = registry.recipe_json([PassRecord(name="ort_graph", config={"level": "all"})], session)
    steps = json.loads(text)
    assert [s["name"] for s in steps] == ["ort_graph", registry.RUNTIME_STEP]
    assert registry.session_from_recipe(text) == session


def test_import_does_not_load_heavy_frameworks_or_touch_home(tmp_path: Path):
    # setup: an empty HOME shows any write into the user's home
    code = (
        "import sys, bladeflow.flows.optimize, bladeflow.serving, bladeflow.app.cli,"
        " bladeflow.tasks.convert.onnx_source;"
        "heavy = [m for m in ('torch', 'tensorflow', 'tensorrt', 'transformers')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "PREFECT_HOME": str(tmp_path / "ph"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    # execute
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        timeout=120,
        check=True,
    )
    # assert
    assert out.stdout.strip() == ""
    assert list(tmp_path.iterdir()) == [] or not (tmp_path / ".prefect").exists()


def test_an_s3_experiment_without_credentials_fails_before_any_work(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # setup: the experiment `bladeflow up` would have made (artifacts in its bucket), and a shell
    # without the stack's environment
    from mlflow import MlflowClient

    from bladeflow.core.errors import RegistryError
    from bladeflow.tasks.register.mlflow_registry import ensure_experiment

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    c.create_experiment(settings.experiment, artifact_location="s3://bladeflow/artifacts")
    # execute / assert
    with pytest.raises(RegistryError, match=r"stack/env.sh.*Nothing was registered"):
        ensure_experiment(settings)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert ensure_experiment(settings)  # with credentials it is usable


def test_a_known_sqlite_experiment_is_found_without_importing_mlflow(tmp_path: Path):
    # setup: a first command creates the database and the experiment through MLflow
    home = tmp_path / "home"
    script = (
        "import sys, json\n"
        "from bladeflow.core.settings import Settings\n"
        "from bladeflow.tasks.register.mlflow_registry import ensure_experiment\n"
        f"s = Settings.from_env(home={str(home)!r})\n"
        "eid = ensure_experiment(s)\n"
        "print(json.dumps([eid, 'mlflow' in sys.modules]))\n"
    )

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "BLADEFLOW_", "PREFECT_"))  # this home's own database
    }

    def run() -> list[object]:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
        )
        return list(json.loads(out.stdout.strip().splitlines()[-1]))

    first = run()
    # execute: a later command on the same home
    second = run()
    # assert: the same experiment, looked up with sqlite3 alone (MLflow's store import is ~4 s)
    assert first == [first[0], True]
    assert second == [first[0], False]
    # a database another MLflow version verified goes through MLflow's own check again
    marker = next(home.glob("*.bladeflow-checked"))
    marker.write_text("0.0.1\n")
    assert run() == [first[0], True]
    assert marker.read_text().strip() != "0.0.1"
