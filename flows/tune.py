"""The serving-tune task and flow: ``tasks/benchmark/serving_tune.py`` under Prefect.

The task runs the stage (search, capacity, registry records) and publishes the per-configuration
table as a Prefect table artifact; the flow is what ``bladeflow tune-serving`` runs, and the
optimize/nightly flows call the task after registering a version.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from bladeflow.core.contract import OptimizeResult, StageResult
from bladeflow.core.outcome import Outcome, Status
from bladeflow.core.params import OptimizeParams, TuneParams
from bladeflow.core.settings import Settings
from bladeflow.tasks.benchmark.serving_tune import (
    TuneResult,
    capacity_markdown,
    record,
    tune_serving,
)


@task(name="tune-serving", cache_policy=NO_CACHE)
def tune_serving_task(params: TuneParams) -> TuneResult:
    """Tune serving for one version and record the winner, table and capacity."""
    logger = get_run_logger()
    settings = Settings.from_env().with_tracking_uri(params.tracking_uri)
    workdir = settings.workdir / "serving-tune" / f"{params.name}-{params.version}"
    result = tune_serving(
        settings,
        params.name,
        params.version,
        slo_p99_ms=params.slo_p99_ms,
        budget_s=params.budget_s,
        target_qps=params.target_qps,
        source=params.source,
        workdir=workdir,
        say=logger.info,
    )
    written = record(settings, result, workdir / "report")
    logger.info("serving tune of %s v%s recorded: %s", result.name, result.version, written)
    key = f"serving-tune-{result.name}".lower().replace(".", "-").replace("_", "-")
    create_table_artifact(
        key=key,
        table=result.table,
        description=f"{result.name} v{result.version}: sustained QPS at p99 <= "
        f"{result.slo_p99_ms:g} ms per serving configuration (client and server columns)",
    )
    create_markdown_artifact(key=f"{key}-capacity", markdown=capacity_markdown(result))
    return result


@flow(name="tune-serving", log_prints=True)
def tune_serving_flow(params: TuneParams) -> TuneResult:
    """Tune ``bladeflow serve`` for a registered version (see tasks/benchmark/serving_tune.py)."""
    return tune_serving_task(params)


TUNE_STAGE = "tune-serving"


def tune_registered(params: OptimizeParams, result: OptimizeResult) -> OptimizeResult:
    """``result`` with the serving tune of the version it registered (``params.tune``).

    Runs after registration and never undoes it: a tune that raises leaves the version registered
    (serving with the defaults) and ``serving_tune_reason`` says why, as does the stage's reason.
    """
    if result.outcome != Outcome.REGISTERED.value or not result.version:
        return result.model_copy(update={"serving_tune_reason": "nothing registered to tune"})
    logger = get_run_logger()
    stage = StageResult(stage=TUNE_STAGE, status=Status.OK, elapsed_s=0.0)
    started = time.perf_counter()
    update: dict[str, object] = {}
    try:
        tune = TuneParams(
            name=result.name,
            version=result.version,
            tracking_uri=params.tracking_uri,
            **params.tune.model_dump(),
        )
        tuned = tune_serving_task(tune)
    except Exception as exc:  # reported in the result and the run log, never hidden
        logger.exception("tune-serving of %s v%s failed", result.name, result.version)
        reason = (
            f"serving tune failed, so version {result.version} stays registered without a "
            f"serving config (it serves with the defaults): {type(exc).__name__}: {exc}"
        )
        stage.status, stage.reason = Status.FAILED, reason[:2000]
        update["serving_tune_reason"] = stage.reason
    else:
        update["serving_config"] = tuned.serving_config
        update["capacity"] = tuned.capacity.model_dump(mode="json")
        stage.outputs = {"serving_config": tuned.serving_config, "seconds": tuned.seconds}
        stage.metrics = {"tuned_qps": tuned.tuned_qps, "default_qps": tuned.default_qps}
        if tuned.serving_config is None:
            stage.reason = f"{tuned.reason}; the version serves with the defaults"
            update["serving_tune_reason"] = stage.reason
    stage.elapsed_s = round(time.perf_counter() - started, 3)
    return result.model_copy(update={**update, "stages": [*result.stages, stage]})
