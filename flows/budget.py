"""The accuracy budget task of the optimize flow: resolve it once the source's outputs are known,
say it, and record it in the MLflow run, before any candidate is built or judged."""

from __future__ import annotations

import json

import numpy as np
from prefect import get_run_logger, task

from bladeflow.core.contract import ModelArtifact
from bladeflow.core.params import OptimizeParams
from bladeflow.core.policy import TolerancePolicy
from bladeflow.core.settings import Settings
from bladeflow.tasks.register import mlflow_registry as reg
from bladeflow.tasks.validate.budget import resolve_budget

# MLflow params of the run (flows/candidates.py run_params logs the rest at the start).
PARAM_BUDGET = "accuracy_budget"  # the resolved budget, per output: 'y:cosine>=0.99,...'
PARAM_POLICY = "policy"  # the gate policy it stands for (JSON)


@task(name="accuracy-budget")
def accuracy_budget_task(
    settings: Settings,
    run_id: str,
    params: OptimizeParams,
    model: ModelArtifact,
    reference: str,
    synthetic: bool,
) -> TolerancePolicy:
    """The gate policy of this run: ``policy``/``--atol..`` as given, else the budget resolved on
    the source's outputs (what each one is). Logged and recorded as MLflow params."""
    budget = params.accuracy_budget()
    if budget is None:  # an explicit tolerance or policy: today's gate, recorded at the start
        policy = params.effective_policy()
        get_run_logger().info(
            "accuracy budget: %s",
            "the given policy" if params.policy else "elementwise (--atol/--rtol/--min-cosine)",
        )
        return policy
    with np.load(reference, allow_pickle=False) as npz:
        ref = {k: npz[k] for k in npz.files}
    resolved = resolve_budget(budget, ref, model.path, synthetic)
    get_run_logger().info("%s", resolved.describe())
    from mlflow.entities import Param

    with reg.mlflow_errors(settings, "recording the accuracy budget"):
        reg.client(settings).log_batch(
            run_id,
            params=[
                Param(PARAM_BUDGET, (resolved.policy.budget or "")[:6000]),
                Param(
                    PARAM_POLICY,
                    json.dumps(resolved.policy.model_dump(mode="json"), sort_keys=True)[:6000],
                ),
            ],
        )
    return resolved.policy
