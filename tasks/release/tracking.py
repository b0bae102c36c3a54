"""The MLflow run of a release: one per release, in experiment ``bladeflow-releases``.

Params: the plan (flattened), model, version, actor, champion at start. Metrics: per stage, with
the stage index as the step (weight, request counts, error rates, p99s, agreement, passed).
Tags: outcome and reason at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from bladeflow.core.errors import RegistryError
from bladeflow.core.mlflow_client import mlflow_client
from bladeflow.core.settings import Settings

EXPERIMENT = "bladeflow-releases"
ENV_EXPERIMENT = "BLADEFLOW_RELEASE_EXPERIMENT"


client = mlflow_client  # the one factory (bladeflow.core.mlflow_client)


def experiment_id(c: Any, settings: Settings) -> str:
    from mlflow.exceptions import MlflowException

    name = os.environ.get(ENV_EXPERIMENT, EXPERIMENT)
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(c.create_experiment(name, artifact_location=settings.artifact_root))
        except MlflowException:
            exp = c.get_experiment_by_name(name)  # created concurrently
            if exp is None:
                raise
            return str(exp.experiment_id)
    except MlflowException as exc:
        raise RegistryError(f"cannot use MLflow at {settings.tracking_uri}: {exc.message}") from exc


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """{"plan.stages.0.weight": "0", ...}: MLflow params are flat strings."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(f"{prefix}.{i}", v))
        return out
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return {prefix: text[:6000]}


def start_run(c: Any, settings: Settings, name: str, version: str, params: dict[str, Any]) -> str:
    from mlflow.entities import Param

    run = c.create_run(
        experiment_id(c, settings),
        run_name=f"release-{name}-v{version}",
        tags={"bladeflow.model": name, "bladeflow.version": version, "bladeflow.flow": "release"},
    )
    items = [Param(k, v) for k, v in flatten("", params).items()]
    for start in range(0, len(items), 90):  # MLflow caps a batch at 100 params
        c.log_batch(run.info.run_id, params=items[start : start + 90])
    return str(run.info.run_id)


def log_metrics(c: Any, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
    if items:
        c.log_batch(run_id, metrics=items)


def end_run(c: Any, run_id: str, status: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        c.set_tag(run_id, key, value[:5000])
    c.set_terminated(run_id, status=status)
