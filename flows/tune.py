"""The serving-tune task and flow: ``tasks/benchmark/serving_tune.py`` under Prefect.

The task runs the stage (search, capacity, registry records) and publishes the per-configuration
table as a Prefect table artifact; the flow is what ``bladeflow tune-serving`` runs, and the
optimize/nightly flows call the task after registering a version.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from bladeflow.core.params import TuneParams
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
