"""``optimize --tune-serving``: the optimize flow tunes the version it registered (real Prefect,
real MLflow on SQLite, real ONNX Runtime and, in the slow test, real `bladeflow serve` processes);
a tuner that fails never undoes the registration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from bladeflow.core import registry
from bladeflow.core.params import OptimizeParams
from bladeflow.core.settings import Settings
from tests import models

BIN = [sys.executable, "-m", "bladeflow.app.cli"]


def _cli(args: list[str], home: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BLADEFLOW_HOME": str(home)}
    env.pop("PREFECT_HOME", None)  # the CLI puts Prefect's state under BLADEFLOW_HOME
    for leaked in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(leaked, None)
    return subprocess.run(
        [*BIN, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=home.parent
    )


def _mlp(tmp_path: Path) -> tuple[Path, Path]:
    src = models.mlp(tmp_path / "mlp.onnx", features=8)
    data = tmp_path / "val.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    return src, data


@pytest.mark.usefixtures("prefect_harness")
def test_a_failed_tune_leaves_the_version_registered_and_says_why(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
) -> None:
    from bladeflow.flows.optimize import optimize_flow

    # setup: a file sits where the tuner's work folder goes, so the real tuner fails at its start
    src, data = _mlp(tmp_path)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    (settings.workdir / "serving-tune").write_text("not a folder")
    params = OptimizeParams(
        source=str(src),
        name="mlp-tune-fails",
        data=str(data),
        batch_sizes=[1],
        passes="ort_graph:level=all",
        bench=bench_fast,
        tune_serving=True,
        tune={"budget_s": 40},
    )
    # execute
    result = optimize_flow(params)
    # assert: registered as without --tune-serving; the result and the stage say why not tuned
    assert result.outcome == "registered" and result.version == "1"
    assert result.serving_config is None and result.capacity is None
    reason = result.serving_tune_reason or ""
    assert (
        reason.startswith("serving tune failed, so version 1 stays registered")
        and "Error" in reason
    )
    register, tune = result.stages[-2:]
    assert (register.stage, register.status) == ("register", "OK")
    assert (tune.stage, tune.status, tune.reason) == ("tune-serving", "FAILED", reason)
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    mv = c.get_model_version("mlp-tune-fails", "1")
    assert mv.tags[registry.TAG_VALIDATED] == "true"
    assert registry.TAG_SERVING_CONFIG not in mv.tags
    assert str(c.get_model_version_by_alias("mlp-tune-fails", "candidate").version) == "1"
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[registry.RUN_TAG_OUTCOME] == "registered"


def test_tune_flags_without_tune_serving_are_refused_before_any_work(tmp_path: Path) -> None:
    # setup
    src, _ = _mlp(tmp_path)
    home = tmp_path / "home"
    # execute
    stray = _cli(["optimize", str(src), "-n", "m", "--tune-budget-s", "60"], home)
    short = _cli(["optimize", str(src), "-n", "m", "--tune-serving", "--tune-budget-s", "5"], home)
    # assert: exit 2 with the fix in the message; nothing ran (no registry, no Prefect state)
    assert stray.returncode == 2, stray.stderr
    assert "without --tune-serving, --tune-budget-s would be ignored" in stray.stderr
    assert short.returncode == 2, short.stderr
    assert "tune.budget_s" in short.stderr and "greater than or equal to 40" in short.stderr
    assert not (home / "mlflow.db").exists() and not (home / "prefect-local").exists()


@pytest.mark.slow  # optimize + a 40 s tune + server start-ups: ~2 min on the shared 2 cores
def test_optimize_tune_serving_tags_the_version_and_reports_capacity(tmp_path: Path) -> None:
    # setup
    src, data = _mlp(tmp_path)
    home = tmp_path / "home"
    # execute
    out = _cli(
        [
            "optimize", str(src), "-n", "mlp-tuned", "--data", str(data), "-b", "1",
            "--passes", "ort_graph:level=all", "--bench-rounds", "2", "--bench-iterations", "3",
            "--tune-serving", "--tune-budget-s", "40", "--tune-slo-p99-ms", "500",
            "--tune-target-qps", "100", "--json",
        ],
        home,
    )  # fmt: skip
    # assert: the JSON carries the winner and the capacity; the version has the tag
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["version"] == "1" and result["serving_tune_reason"] is None
    config = result["serving_config"]
    assert config["slo_p99_ms"] == 500.0 and config["sustained_qps"] > 0
    capacity = result["capacity"]
    assert capacity["target_qps"] == 100.0 and capacity["chosen"]["qps_per_core"] > 0
    # a 40 s budget is all the version's: too short to search the source as well, and said so
    assert capacity["source"] is None and "no time for the source's search" in capacity["reason"]
    assert result["stages"][-1]["stage"] == "tune-serving"
    assert result["stages"][-1]["status"] == "OK"
    db = f"sqlite:///{home / 'mlflow.db'}"
    mv = MlflowClient(db, db).get_model_version("mlp-tuned", "1")
    tagged = registry.serving_config_from_tag(mv.tags[registry.TAG_SERVING_CONFIG])
    assert tagged == {k: config[k] for k in registry.SERVING_CONFIG_KEYS}
    assert "## Serving capacity" in (mv.description or "")


def test_a_search_without_a_config_says_why() -> None:
    from bladeflow.tasks.benchmark.serving_search import ConfigResult, ModelTuning, ServingConfig
    from bladeflow.tasks.benchmark.serving_tune import _no_config

    # setup: no time for anything; every configuration failed; measured but over the SLO
    def tuning(*results: ConfigResult) -> ModelTuning:
        return ModelTuning(label="chosen", name="m", version="1", results=list(results),
                           best=None, default=None, seconds=1.0)  # fmt: skip

    failed = ConfigResult(config=ServingConfig(), stage="default", error="RuntimeError: exited 1")
    slow = ConfigResult(config=ServingConfig(), stage="default", sustained_qps=0.0)
    # execute / assert
    assert _no_config(tuning(), 20, 100).startswith("the 20 s budget measured no configuration")
    assert _no_config(tuning(failed), 300, 100) == (
        "no configuration could be measured: RuntimeError: exited 1"
    )
    assert _no_config(tuning(failed, slow), 300, 50) == (
        "no configuration sustained a rate within p99 <= 50 ms"
    )
