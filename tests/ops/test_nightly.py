"""Nightly re-optimization: skips when nothing changed, keeps only real improvements."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from bladeflow.core import registry
from bladeflow.core.params import OptimizeParams, ServingTune
from bladeflow.core.settings import Settings
from bladeflow.flows.nightly import (
    MODEL_TAG_KEY,
    MODEL_TAG_NIGHTLY,
    VERSION_TAG_KEY,
    ModelCheck,
    NightlyParams,
    Outcome,
    Plan,
    _changed,
    _recorded_params,
    nightly_flow,
    summary_markdown,
)
from bladeflow.flows.optimize import optimize_flow
from tests import models

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _optimize(name: str, src: Path, data: Path, bench: dict[str, int]) -> str:
    params = OptimizeParams(
        source=str(src),
        name=name,
        data=str(data),
        batch_sizes=[1],
        passes="ort_graph:level=all",
        bench=bench,
    )
    return optimize_flow(params).version


def _versions(c: MlflowClient, name: str) -> list[str]:
    return sorted(str(v.version) for v in c.search_model_versions(f"name='{name}'"))


def test_second_nightly_run_skips_and_a_slower_rerun_is_not_registered(
    settings: Settings, mlp_model: tuple[Path, Path], bench_fast: dict[str, int]
) -> None:
    # setup: v1 registered and opted in; an unreachable margin, so the re-run cannot win
    src, data = mlp_model
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    assert _optimize("mlp-nightly", src, data, bench_fast) == "1"
    c.set_registered_model_tag("mlp-nightly", MODEL_TAG_NIGHTLY, "true")
    c.create_registered_model("not-opted-in")
    params = NightlyParams(min_speedup=1000.0, bench=bench_fast)
    # execute
    first = nightly_flow(params)
    second = nightly_flow(params)
    # assert: first run re-optimized, judged, discarded; the registry is as before
    assert [c_.name for c_ in first] == ["mlp-nightly"]
    assert first[0].outcome == Outcome.NOT_IMPROVED and first[0].speedup is not None
    assert first[0].speedup < 1000.0 and first[0].new_version is None
    assert _versions(c, "mlp-nightly") == ["1"]
    assert str(c.get_model_version_by_alias("mlp-nightly", registry.ALIAS_CANDIDATE).version) == "1"
    # nothing was registered then deleted: the re-run's MLflow run says why it registered nothing
    (rerun,) = c.search_runs(
        [c.get_run(str(c.get_model_version("mlp-nightly", "1").run_id)).info.experiment_id],
        "tags.`bladeflow.outcome` = 'not_improved'",
    )
    assert "below min_speedup 1000.0" in rerun.data.tags["bladeflow.reason"]
    assert rerun.data.metrics["speedup_vs_incumbent"] == pytest.approx(first[0].speedup, abs=1e-3)
    key = c.get_registered_model("mlp-nightly").tags[MODEL_TAG_KEY]
    assert key == first[0].key and len(key) == 32
    # assert: the second run skipped it because nothing changed
    assert second[0].outcome == Outcome.UNCHANGED and second[0].reason == "nothing changed"
    assert second[0].key == key
    assert _versions(c, "mlp-nightly") == ["1"]


def test_unreachable_source_is_reported_not_reoptimized(settings: Settings, tmp_path: Path) -> None:
    # setup: an opted-in model whose current version's source file has gone away
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    c.create_registered_model("mlp-gone", tags={MODEL_TAG_NIGHTLY: "true"})
    gone = tmp_path / "deleted.onnx"
    c.create_model_version("mlp-gone", source=str(tmp_path), tags={registry.TAG_SOURCE: str(gone)})
    c.set_registered_model_alias("mlp-gone", registry.ALIAS_CANDIDATE, "1")
    # execute
    checks = nightly_flow(NightlyParams(models=["mlp-gone"]))
    # assert
    assert checks[0].outcome == Outcome.FAILED
    assert "is not reachable from this worker" in checks[0].reason
    assert _versions(c, "mlp-gone") == ["1"]
    assert MODEL_TAG_KEY not in c.get_registered_model("mlp-gone").tags


@pytest.mark.slow
def test_changed_source_is_reoptimized_and_a_faster_version_is_kept(
    settings: Settings, mlp_model: tuple[Path, Path], bench_fast: dict[str, int]
) -> None:
    # setup: last night's key is recorded, then the source file changes (retrained weights)
    src, data = mlp_model
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    _optimize("mlp-kept", src, data, bench_fast)
    c.set_registered_model_tag("mlp-kept", MODEL_TAG_NIGHTLY, "true")
    lenient = NightlyParams(min_speedup=0.01, bench=bench_fast, tune_serving=False)
    nightly_flow(lenient)  # records the key (and keeps v2: any speed beats 0.01)
    assert registry.TAG_SERVING_CONFIG not in c.get_model_version("mlp-kept", "2").tags
    models.mlp(src, features=8, seed=7)
    tuned = lenient.model_copy(
        update={"tune_serving": True, "tune": ServingTune(budget_s=40, slo_p99_ms=500)}
    )
    # execute
    checks = nightly_flow(tuned)
    # assert
    assert checks[0].outcome == Outcome.IMPROVED and checks[0].new_version == "3"
    assert checks[0].reason.startswith("changed: source_sha256 changed since the last check")
    assert _versions(c, "mlp-kept") == ["1", "2", "3"]
    v3 = c.get_model_version("mlp-kept", "3")
    assert v3.tags[VERSION_TAG_KEY] == checks[0].key
    assert str(c.get_model_version_by_alias("mlp-kept", registry.ALIAS_CANDIDATE).version) == "3"
    # assert: the kept version was tuned for serving (real servers), and the check says so
    assert checks[0].serving_config is not None and "; serving tuned: " in checks[0].reason
    tag = registry.serving_config_from_tag(v3.tags[registry.TAG_SERVING_CONFIG])
    assert tag == {k: checks[0].serving_config[k] for k in registry.SERVING_CONFIG_KEYS}


def test_a_failed_tune_keeps_the_nightly_version_and_says_why(
    settings: Settings, mlp_model: tuple[Path, Path], bench_fast: dict[str, int]
) -> None:
    # setup: opted in; a file where the tuner's work folder goes, so the real tuner fails early
    src, data = mlp_model
    c = MlflowClient(settings.tracking_uri, settings.registry_uri)
    _optimize("mlp-untuned", src, data, bench_fast)
    c.set_registered_model_tag("mlp-untuned", MODEL_TAG_NIGHTLY, "true")
    settings.workdir.mkdir(parents=True, exist_ok=True)
    (settings.workdir / "serving-tune").write_text("not a folder")
    # execute: the defaults tune every registered version
    (check,) = nightly_flow(NightlyParams(min_speedup=0.01, bench=bench_fast))
    # assert: kept and registered as without tuning; the reason says why it was not tuned
    assert check.outcome == Outcome.IMPROVED and check.new_version == "2"
    assert "; not tuned: serving tune failed, so version 2 stays registered" in check.reason
    assert check.serving_config is None
    assert _versions(c, "mlp-untuned") == ["1", "2"]
    v2 = c.get_model_version("mlp-untuned", "2")
    assert registry.TAG_SERVING_CONFIG not in v2.tags and v2.tags[VERSION_TAG_KEY] == check.key


def test_a_forced_check_says_nothing_changed() -> None:
    # setup: the plan's key equals the stored one (a forced re-check of an unchanged model)
    inputs = {"source_sha256": "a", "search_space": "b", "tool_versions": "c", "hardware": "d"}
    plan = Plan(
        name="m",
        current_version="1",
        candidate_version=None,
        params=OptimizeParams(source="m.onnx", name="m"),
        key="k",
        inputs=inputs,
        stored_key="k",
        stored_inputs=inputs,
    )
    # execute / assert
    assert _changed(plan) == "nothing changed, forced check"
    moved = plan.model_copy(update={"key": "k2", "inputs": {**inputs, "tool_versions": "z"}})
    assert _changed(moved) == "tool_versions changed since the last check"


def test_summary_lists_every_outcome() -> None:
    # setup
    checks = [
        ModelCheck(name="a", outcome=Outcome.UNCHANGED, reason="nothing changed"),
        ModelCheck(name="b", outcome=Outcome.IMPROVED, new_version="4", speedup=1.3),
        ModelCheck(name="c", outcome=Outcome.FAILED, reason="source x | y missing"),
    ]
    # execute
    md = summary_markdown(checks)
    # assert
    assert "checked 3: skipped 1, improved 1, not_improved 0, failed 1" in md
    assert "| b | improved |  | 4 | x1.30 |" in md
    assert "source x / y missing" in md
    assert MODEL_TAG_NIGHTLY in summary_markdown([])


def test_must_beat_naming_no_version_is_a_usage_error_before_any_work(settings: Settings) -> None:
    # setup
    from bladeflow.core.errors import UserInputError
    from bladeflow.tasks.benchmark.incumbent import resolve_version

    MlflowClient(settings.tracking_uri, settings.registry_uri).create_registered_model("m-empty")
    # execute / assert
    with pytest.raises(UserInputError, match="has no such version or alias"):
        resolve_version(settings, "m-empty", "champion")
    with pytest.raises(UserInputError, match="must_beat='7'"):
        resolve_version(settings, "m-empty", "7")


def test_recorded_accuracy_budget_is_what_the_nightly_rerun_gates_with(settings: Settings) -> None:
    # setup: the params an optimize run logs with --accuracy, with defaults, and with --atol
    base = {"tolerance.atol": "0.0001", "tolerance.rtol": "0.001", "tolerance.min_cosine": "0.999"}
    stated = {**base, "accuracy": "cosine>=0.99"}
    exact = {**base, "accuracy": "elementwise"}
    # execute
    a = _recorded_params(stated, "m.onnx", "m", settings)
    b = _recorded_params(exact, "m.onnx", "m", settings)
    c = _recorded_params(base, "m.onnx", "m", settings)  # a run from before accuracy budgets
    # assert
    assert a.accuracy == "cosine>=0.99" and a.accuracy_budget() is not None
    assert b.accuracy is None and b.accuracy_budget() is None  # the elementwise tolerance
    assert c.accuracy_budget() is None and c.tolerance.atol == 0.0001
