"""Register bladeflow's Prefect deployments on a work pool.

``python -m bladeflow.flows.deployments --work-pool bladeflow`` (``bladeflow up`` runs it) creates
the work pool if it is missing and registers, from this source tree:

- ``optimize/optimize``: the optimize flow; its parameters are the typed ``OptimizeParams``, so the
  Prefect UI shows a form;
- ``nightly-reoptimize/nightly-reoptimize``: re-optimization of opted-in models on a cron schedule;
- ``release/release``: the staged gray release of one validated version (typed ``ReleaseParams``);
- ``benchmark/benchmark-on-<pool>`` for the work pool and each ``--target-pool``: the benchmark
  alone, which the optimize flow starts when its ``benchmark_work_pool`` names that pool, so the
  numbers come from the pool's hardware (e.g. GPU workers) while the rest runs anywhere;
- ``optimize/optimize-on-<pool>`` for each ``--target-pool``: the whole optimize flow on that pool.

To add a deployment, add a :class:`DeploymentSpec` to :data:`DEPLOYMENTS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from bladeflow.flows.benchmark import deployment_name

OPTIMIZE = "optimize"
NIGHTLY = "nightly-reoptimize"
RELEASE = "release"
DEFAULT_CRON = "0 2 * * *"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: which flow (``file.py:function`` from the project root) and how it runs."""

    name: str
    flow_name: str  # the @flow(name=...) of the entrypoint: runs are "flow_name/name"
    entrypoint: str
    description: str
    scheduled: bool = False  # True: runs on the nightly cron schedule
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ("bladeflow",)


DEPLOYMENTS: list[DeploymentSpec] = [
    DeploymentSpec(
        name=OPTIMIZE,
        flow_name="optimize",
        entrypoint="flows/optimize.py:optimize_flow",
        description="Convert, optimize, validate, benchmark and register one model.",
    ),
    DeploymentSpec(
        name=NIGHTLY,
        flow_name="nightly-reoptimize",
        entrypoint="flows/nightly.py:nightly_flow",
        description="Re-optimize every model tagged bladeflow.nightly=true when its source, "
        "search space, tools or hardware changed; keep a new version only if it is faster.",
        scheduled=True,
    ),
    DeploymentSpec(
        name=RELEASE,
        flow_name="release",
        entrypoint="flows/release.py:release_flow",
        description="Staged gray release of one validated version: shadow, canary steps gated "
        "on live metrics, champion; rollback on any failed gate.",
    ),
]

# Deployed once per work pool as benchmark-on-<pool> (see flows/benchmark.py).
BENCHMARK = DeploymentSpec(
    name="benchmark",
    flow_name="benchmark",
    entrypoint="flows/benchmark.py:benchmark_flow",
    description="Time candidate models on this pool's hardware; started by the optimize flow "
    "when its benchmark_work_pool names this pool.",
)


def project_root() -> Path:
    """The folder that holds ``flows/`` (the source the worker runs the flows from)."""
    return Path(__file__).resolve().parent.parent


def ensure_work_pool(name: str, pool_type: str = "process") -> bool:
    """Create the work pool with its type's default job template if missing; True if created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        template: dict[str, Any] = {}
        if pool_type == "process":
            from prefect.workers.process import ProcessWorker

            template = ProcessWorker.get_default_base_job_template()
        try:
            client.create_work_pool(
                WorkPoolCreate(name=name, type=pool_type, base_job_template=template)
            )
        except ObjectAlreadyExists:  # created concurrently
            return False
        return True


def deploy(
    spec: DeploymentSpec,
    work_pool: str,
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    name: str | None = None,
    source: Path | None = None,
) -> UUID:
    """Register one deployment of ``spec`` on ``work_pool`` (idempotent: updates in place)."""
    from prefect import flow
    from prefect.schedules import Cron

    loaded: Any = flow.from_source(source=str(source or project_root()), entrypoint=spec.entrypoint)
    dep_id: UUID = loaded.deploy(
        name=name or spec.name,
        work_pool_name=work_pool,
        build=False,
        push=False,
        schedules=[Cron(cron, timezone=timezone)] if spec.scheduled else None,
        parameters=spec.parameters or None,
        description=spec.description,
        tags=list(spec.tags),
        print_next_steps=False,
        ignore_warnings=True,
    )
    return dep_id


def deploy_all(
    work_pool: str = "bladeflow",
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    target_pools: Sequence[str] = (),
) -> dict[str, UUID]:
    """Register :data:`DEPLOYMENTS` and ``benchmark-on-<pool>`` on ``work_pool``, and both
    ``benchmark-on-<pool>`` and ``optimize-on-<pool>`` on each target pool (which must exist or
    is created as a process pool).

    Returns:
        ``"flow/deployment"`` -> deployment id.
    """
    ensure_work_pool(work_pool)
    ids: dict[str, UUID] = {}
    for spec in DEPLOYMENTS:
        ids[f"{spec.flow_name}/{spec.name}"] = deploy(spec, work_pool, cron, timezone)
    for pool in target_pools:
        ensure_work_pool(pool)
    optimize = next(s for s in DEPLOYMENTS if s.name == OPTIMIZE)
    for pool in dict.fromkeys([work_pool, *target_pools]):
        name = deployment_name(pool)
        ids[f"{BENCHMARK.flow_name}/{name}"] = deploy(BENCHMARK, pool, name=name)
    for pool in target_pools:
        name = f"{OPTIMIZE}-on-{pool}"
        ids[f"{optimize.flow_name}/{name}"] = deploy(optimize, pool, name=name)
    return ids


def with_dask(
    flow_obj: Any, address: str | None = None, n_workers: int = 1, threads: int = 2
) -> Any:
    """``flow_obj`` with its tasks (e.g. candidate builds and validations) on a Dask cluster.

    Needs ``prefect-dask``. Without ``address`` a local cluster starts for the run (threads, no
    extra processes: light enough for a laptop); with ``tcp://scheduler:8786`` the tasks fan out
    to an existing cluster's workers.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": n_workers,
                "processes": False,
                "threads_per_worker": threads,
            }
        )
    return flow_obj.with_options(task_runner=runner)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bladeflow.flows.deployments``: register deployments with ``PREFECT_API_URL``."""
    parser = argparse.ArgumentParser(
        prog="python -m bladeflow.flows.deployments", description=__doc__
    )
    parser.add_argument("--work-pool", default="bladeflow", help="process work pool to use")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="nightly schedule (cron)")
    parser.add_argument("--timezone", default="UTC", help="time zone of the schedule")
    parser.add_argument(
        "--target-pool",
        action="append",
        default=[],
        help="also deploy benchmark-on-POOL and optimize-on-POOL on this pool (repeatable)",
    )
    args = parser.parse_args(argv)
    ids = deploy_all(args.work_pool, args.cron, args.timezone, args.target_pool)
    for name, dep_id in ids.items():
        print(f"{name} {dep_id}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
