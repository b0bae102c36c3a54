"""The CLI as users run it: a real process, real exit codes, stdout/stderr kept apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import models

BIN = [sys.executable, "-m", "bladeflow.app.cli"]


def _run(args: list[str], home: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BLADEFLOW_HOME": str(home)}
    env.pop("PREFECT_HOME", None)  # the CLI puts Prefect's state under BLADEFLOW_HOME
    for leaked in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(leaked, None)  # the CLI must resolve everything from BLADEFLOW_HOME
    return subprocess.run(
        [*BIN, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=home.parent
    )


def _registered(home: Path) -> list[str]:
    from mlflow import MlflowClient

    db = home / "mlflow.db"
    if not db.exists():
        return []
    c = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    return [m.name for m in c.search_registered_models()]


def test_help_explains_options(tmp_path: Path):
    out = _run(["optimize", "--help"], tmp_path / "h")
    assert out.returncode == 0
    for option in ("--name", "--data", "--batch-sizes", "--tracking-uri", "--json"):
        assert option in out.stdout


def _missing(d: Path) -> Path:
    return d / "missing.onnx"


def _empty(d: Path) -> Path:
    (d / "empty.onnx").write_bytes(b"")
    return d / "empty.onnx"


def _pickle_named_pt(d: Path) -> Path:
    (d / "m.pt").write_bytes(b"\x80\x02}q")
    return d / "m.pt"


def _garbage_onnx(d: Path) -> Path:
    (d / "bad.onnx").write_bytes(b"\x08\x07garbage" * 50)
    return d / "bad.onnx"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_missing, "does not exist"),
        (_empty, "empty"),
        (_pickle_named_pt, "is a Python pickle, not TorchScript"),
        (_garbage_onnx, "not a readable ONNX model|fails the ONNX checker|no graph"),
    ],
)
def test_bad_model_files_exit_2_without_traceback(tmp_path: Path, make, needle: str):
    # setup
    src = make(tmp_path)
    home = tmp_path / "home"
    # execute
    out = _run(["optimize", str(src), "--name", "m"], home)
    # assert
    assert out.returncode == 2, out.stderr
    assert "bad input" in out.stderr
    assert "Traceback" not in out.stderr
    import re

    assert re.search(needle, out.stderr), out.stderr
    assert out.stdout == ""
    assert _registered(home) == []


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"wrong": np.zeros((2, 8), np.float32)}, "missing input"),
        ({"x": np.zeros((2, 5), np.float32)}, "dim 1 is 5, must be 8"),
    ],
)
def test_data_that_does_not_match_exits_2(tmp_path: Path, arrays, needle: str):
    src = models.mlp(tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    home = tmp_path / "home"
    out = _run(["optimize", str(src), "--name", "m", "--data", str(data)], home)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr
    assert _registered(home) == []


def test_bad_name_and_options_exit_2(tmp_path: Path):
    src = models.mlp(tmp_path / "m.onnx")
    for args, needle in [
        (["--name", "a/b"], "not allowed"),
        (["--name", "ok", "--batch-sizes", "1,x"], "--batch-sizes"),
        (["--name", "ok", "--objective", "speed@1"], "objective"),
        (["--name", "ok", "--passes", "nope"], "unknown optimization pass"),
    ]:
        out = _run(["optimize", str(src), *args], tmp_path / "home")
        assert out.returncode == 2, (args, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr


def test_demo_refuses_a_tune_option_without_tune_serving(tmp_path: Path):
    # execute: a tune setting that would be ignored
    out = _run(["demo", "--tune-budget-s", "60"], tmp_path / "home")
    # assert: refused before any work, saying what to add
    assert out.returncode == 2, out.stderr
    assert "add --tune-serving" in out.stderr and "Traceback" not in out.stderr
    assert _registered(tmp_path / "home") == []


def test_optimize_json_registers_a_version(tmp_path: Path):
    # setup: a model no other test uses, with a fixed batch dimension
    src = models.mlp(tmp_path / "fresh.onnx", features=6, hidden=10, outputs=3, seed=7, batch=1)
    home = tmp_path / "home"
    # execute
    out = _run(
        [
            "optimize",
            str(src),
            "--name",
            "fresh",
            "--json",
            "--bench-rounds",
            "2",
            "--bench-iterations",
            "3",
        ],
        home,
    )
    # assert
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    for key in (
        "name",
        "version",
        "model_uri",
        "run_id",
        "recipe",
        "accuracy",
        "latency_ms",
        "throughput",
        "speedup",
    ):
        assert key in result
    assert result["name"] == "fresh" and result["version"] == "1"
    assert set(result["latency_ms"]["source"]) == {"1"}  # fixed batch: 8 and 32 skipped
    assert "register" in out.stderr  # progress went to stderr
    assert _registered(home) == ["fresh"]
    # execute: re-optimize, demanding an impossible speedup over v1
    again = _run(
        [
            "optimize",
            str(src),
            "--name",
            "fresh",
            "--must-beat",
            "1",
            "--min-speedup",
            "1000",
            "--passes",
            "ort_graph:level=all",
            "--bench-rounds",
            "2",
            "--bench-iterations",
            "3",
        ],
        home,
    )
    # assert: exit 6, said why, nothing new registered
    assert again.returncode == 6, again.stderr[-3000:]
    assert "Nothing registered" in again.stdout and "--must-beat" in again.stdout
    from mlflow import MlflowClient

    db = f"sqlite:///{home / 'mlflow.db'}"
    versions = MlflowClient(db, db).search_model_versions("name='fresh'")
    assert [str(v.version) for v in versions] == ["1"]
