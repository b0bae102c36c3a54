"""Nightly re-optimization: re-run the optimize flow for opted-in models when something changed.

A registered model opts in with the model tag ``bladeflow.nightly=true``. For each, the current
version (alias ``champion``, else ``candidate``) names its source and the MLflow run that recorded
the optimize parameters. The cache key hashes what can change the result: the source's sha256,
the search space (preset, passes, resolved recipes, objective, batch sizes, tolerance, data), the
tool versions and the hardware fingerprint. An unchanged key skips the model. Otherwise the
optimize flow runs again with the recorded parameters and ``must_beat`` set to the current
version: it times the current version in the same interleaved benchmark as the new candidates and
registers a new version only if it beats the current one by ``min_speedup`` (so nothing is
registered and then deleted). With ``tune_serving`` (on by default) every version it registers is
tuned for serving (tag ``bladeflow.serving_config``) before any release starts; a failed tune keeps
the version and the check's reason says why. Every run leaves a summary artifact.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from bladeflow.core import registry
from bladeflow.core.contract import OptimizeResult, Tolerance
from bladeflow.core.environment import hardware_fingerprint, tool_versions
from bladeflow.core.errors import AccuracyGateError, BladeflowError
from bladeflow.core.hashing import sha256_path
from bladeflow.core.mlflow_client import mlflow_client
from bladeflow.core.outcome import Outcome
from bladeflow.core.params import NightlyParams, OptimizeParams
from bladeflow.core.settings import Settings
from bladeflow.flows.optimize import optimize_flow

MODEL_TAG_NIGHTLY = registry.MODEL_TAG_NIGHTLY
MODEL_TAG_KEY = registry.MODEL_TAG_NIGHTLY_KEY
MODEL_TAG_INPUTS = registry.MODEL_TAG_NIGHTLY_INPUTS
MODEL_TAG_CHECKED = registry.MODEL_TAG_NIGHTLY_CHECKED
VERSION_TAG_KEY = registry.TAG_NIGHTLY_KEY
# What a nightly check can end as (the summary counts these, in this order).
NIGHTLY_OUTCOMES = (Outcome.UNCHANGED, Outcome.IMPROVED, Outcome.NOT_IMPROVED, Outcome.FAILED)


class ModelCheck(BaseModel):
    """What the nightly run did with one model."""

    name: str
    outcome: Outcome
    reason: str = ""
    current_version: str | None = None
    new_version: str | None = None
    speedup: float | None = None
    speedup_ci: tuple[float, float] | None = None  # 95% interval, paired by benchmark round
    key: str | None = None
    released: bool = False
    serving_config: dict[str, Any] | None = None  # the kept version's tuned config, when tuned


class Plan(BaseModel):
    """What a check needs: the current version, the recorded parameters and today's key."""

    name: str
    current_version: str
    candidate_version: str | None
    params: OptimizeParams
    key: str
    inputs: dict[str, str]
    stored_key: str | None
    stored_inputs: dict[str, str] | None = None


# ---------------------------------------------------------------------------------------------


@task(name="list-opted-in", retries=2, retry_delay_seconds=[2, 5])
def list_opted_in(settings: Settings, only: list[str] | None) -> list[str]:
    c = _client(settings)
    found = c.search_registered_models(filter_string=f"tags.`{MODEL_TAG_NIGHTLY}` = 'true'")
    names = sorted(m.name for m in found)
    return [n for n in names if only is None or n in only]


@task(name="plan", task_run_name="plan-{name}", retries=2, retry_delay_seconds=[2, 5])
def plan_task(settings: Settings, name: str, params: NightlyParams) -> Plan | str:
    """The plan for ``name``, or the reason it cannot be re-optimized."""
    c = _client(settings)
    model = c.get_registered_model(name)
    current = candidate = None
    for alias in (registry.ALIAS_CHAMPION, registry.ALIAS_CANDIDATE):
        version = model.aliases.get(alias)
        if version is not None and current is None:
            current = str(version)
    if model.aliases.get(registry.ALIAS_CANDIDATE) is not None:
        candidate = str(model.aliases[registry.ALIAS_CANDIDATE])
    if current is None:
        return "no champion or candidate version to start from"
    mv = c.get_model_version(name, current)
    source = mv.tags.get(registry.TAG_SOURCE)
    if not source:
        return f"version {current} has no {registry.TAG_SOURCE} tag"
    if not Path(source).exists():
        return f"source {source} of version {current} is not reachable from this worker"
    if not mv.run_id:
        return f"version {current} has no MLflow run with its optimize parameters"
    op = _recorded_params(c.get_run(mv.run_id).data.params, source, name, settings)
    if params.bench is not None:
        op = op.model_copy(update={"bench": params.bench})
    inputs = _key_inputs(op)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    return Plan(
        name=name,
        current_version=current,
        candidate_version=candidate,
        params=op,
        key=key,
        inputs=inputs,
        stored_key=model.tags.get(MODEL_TAG_KEY),
        stored_inputs=_stored_inputs(model.tags.get(MODEL_TAG_INPUTS)),
    )


@task(name="tag-kept-version", retries=2, retry_delay_seconds=[2, 5])
def tag_kept_task(settings: Settings, plan: Plan, new: str) -> None:
    _client(settings).set_model_version_tag(plan.name, new, VERSION_TAG_KEY, plan.key)


@task(name="record-key", retries=2, retry_delay_seconds=[2, 5])
def record_key_task(settings: Settings, plan: Plan) -> None:
    c = _client(settings)
    c.set_registered_model_tag(plan.name, MODEL_TAG_KEY, plan.key)
    c.set_registered_model_tag(plan.name, MODEL_TAG_INPUTS, json.dumps(plan.inputs)[:5000])
    c.set_registered_model_tag(
        plan.name, MODEL_TAG_CHECKED, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )


# ---------------------------------------------------------------------------------------------


@flow(name="nightly-reoptimize")
def nightly_flow(params: NightlyParams | None = None) -> list[ModelCheck]:
    """Re-optimize every opted-in model whose inputs changed; keep only real improvements."""
    params = params or NightlyParams()
    settings = Settings.from_env().with_tracking_uri(params.tracking_uri)
    checks: list[ModelCheck] = []
    errors: list[str] = []
    for name in list_opted_in(settings, params.models):
        try:
            checks.append(check_model(settings, name, params))
        except Exception as exc:  # noqa: BLE001 - recorded, reported and re-raised below
            get_run_logger().exception("nightly: %s failed", name)
            errors.append(name)
            checks.append(
                ModelCheck(name=name, outcome=Outcome.FAILED, reason=f"{type(exc).__name__}: {exc}")
            )
    create_markdown_artifact(
        summary_markdown(checks), key="nightly-reoptimize", description="nightly re-optimization"
    )
    if errors:  # the other models were still checked; the run itself must show the failure
        raise NightlyError(f"nightly re-optimization failed for {', '.join(errors)} (see summary)")
    return checks


class NightlyError(BladeflowError):
    """One or more models could not be checked because of an error (not a verdict)."""


def check_model(settings: Settings, name: str, params: NightlyParams) -> ModelCheck:
    """One model: plan, skip or re-optimize, compare, keep or discard, record the key.

    Models are checked one after another on purpose: benchmarks must not share the cores.
    """
    logger = get_run_logger()
    plan = plan_task(settings, name, params)
    if isinstance(plan, str):
        return ModelCheck(name=name, outcome=Outcome.FAILED, reason=plan)
    base = {"name": name, "current_version": plan.current_version, "key": plan.key}
    if plan.stored_key == plan.key and not params.force:
        return ModelCheck(**base, outcome=Outcome.UNCHANGED, reason="nothing changed")
    changed = _changed(plan)
    logger.info("nightly: re-optimizing %s (changed: %s)", name, changed)
    # The optimize flow times the current version beside the new candidates and registers
    # nothing unless the chosen one beats it by min_speedup: no version to delete afterwards.
    # With tune_serving, the optimize flow tunes the version it registers before returning, so a
    # release started below runs it with its own serving config from the first request.
    op = plan.params.model_copy(
        update={
            "must_beat": plan.current_version,
            "min_speedup": params.min_speedup,
            "tune_serving": params.tune_serving,
            "tune": params.tune,
        }
    )
    try:
        result = optimize_flow(op)
    except AccuracyGateError as exc:
        record_key_task(settings, plan)  # deterministic: same inputs fail the same way
        return ModelCheck(**base, outcome=Outcome.FAILED, reason=f"accuracy gate: {exc}")
    except BladeflowError as exc:
        return ModelCheck(**base, outcome=Outcome.FAILED, reason=str(exc))
    keep = result.outcome == Outcome.REGISTERED
    speedup = result.incumbent_speedup or 0.0
    lo, hi = result.incumbent_speedup_ci or (0.0, float("inf"))
    if keep:
        tag_kept_task(settings, plan, result.version)
    record_key_task(settings, plan)
    check = ModelCheck(
        **base,
        outcome=Outcome.IMPROVED if keep else Outcome.NOT_IMPROVED,
        new_version=result.version if keep else None,
        speedup=round(speedup, 3),
        speedup_ci=result.incumbent_speedup_ci,
        serving_config=result.serving_config if keep else None,
        reason=f"changed: {changed}; x{speedup:.2f} [{lo:.2f}-{hi:.2f}] vs "
        f"v{plan.current_version} (low end {'>=' if keep else '<'} {params.min_speedup})"
        f"{_tune_note(result) if keep and params.tune_serving else ''}",
    )
    if keep and params.release:
        check.released = _release(params.release_deployment, name, result.version)
    return check


def _tune_note(result: OptimizeResult) -> str:
    """``; serving tuned: ...`` or ``; not tuned: why`` for a kept version's reason."""
    config = result.serving_config
    if config:
        return (
            f"; serving tuned: {config.get('sustained_qps')} QPS at p99 <= "
            f"{config.get('slo_p99_ms')} ms"
        )
    return f"; not tuned: {result.serving_tune_reason}"


def _speedup(check: ModelCheck) -> str:
    if check.speedup is None:
        return ""
    if check.speedup_ci is None:
        return f"x{check.speedup:.2f}"
    lo, hi = check.speedup_ci
    return f"x{check.speedup:.2f} [{lo:.2f}-{hi:.2f}]"


def summary_markdown(checks: list[ModelCheck]) -> str:
    """The summary artifact: one row per model."""
    counts = {o: sum(c.outcome == o for c in checks) for o in NIGHTLY_OUTCOMES}
    lines = [
        "# Nightly re-optimization",
        "",
        f"checked {len(checks)}: " + ", ".join(f"{o.value} {n}" for o, n in counts.items()),
        "",
        "| model | outcome | current | new | speedup | released | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.name} | {c.outcome.value} | {c.current_version or ''} | {c.new_version or ''} "
            f"| {_speedup(c)} | {'yes' if c.released else ''} "
            f"| {c.reason.replace('|', '/')[:300]} |"
        )
    if not checks:
        lines.append(f"| (none) | | | | | | no model has tag {MODEL_TAG_NIGHTLY}=true |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


_client = mlflow_client


def _recorded_params(
    run_params: dict[str, str], source: str, name: str, settings: Settings
) -> OptimizeParams:
    """Rebuild the optimize parameters from the values the optimize flow logged to its run."""

    def value(key: str) -> Any:
        raw = run_params.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw  # strings are logged as they are

    tolerance = {
        k.removeprefix("tolerance."): value(k) for k in run_params if k.startswith("tolerance.")
    }
    fields: dict[str, Any] = {
        "source": source,
        "name": name,
        "data": run_params.get("data") if run_params.get("data") not in (None, "null") else None,
        "format": value("format"),
        "preset": run_params.get("preset") or "cpu",
        "passes": value("passes"),
        "objective": run_params.get("objective") or "latency@1",
        "tracking_uri": settings.tracking_uri,
    }
    if isinstance(value("batch_sizes"), list):
        fields["batch_sizes"] = value("batch_sizes")
    accuracy = run_params.get("accuracy")
    if accuracy and accuracy != "elementwise":  # the budget the user stated (or 'auto')
        fields["accuracy"] = accuracy
    elif tolerance:  # --atol/--rtol/--min-cosine, or a run from before accuracy budgets
        fields["tolerance"] = Tolerance(**tolerance)
    return OptimizeParams(**{k: v for k, v in fields.items() if v is not None})


def _key_inputs(op: OptimizeParams) -> dict[str, str]:
    """Short hashes of each part of the cache key, so the summary can say what changed."""
    from bladeflow.tasks.optimize.recipes import resolve_recipes

    def digest(obj: Any) -> str:
        blob = json.dumps(obj, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    search = {
        "preset": op.preset,
        "passes": op.passes,
        "recipes": [r.model_dump(mode="json") for r in resolve_recipes(op.preset, op.passes)],
        "objective": op.objective,
        "batch_sizes": op.batch_sizes,
        "tolerance": op.tolerance.model_dump(mode="json"),
        # only when set, so the keys of models optimized before accuracy budgets stay the same
        **({"accuracy": op.accuracy} if op.accuracy else {}),
        "data": sha256_path(op.data) if op.data and Path(op.data).exists() else op.data,
    }
    return {
        "source_sha256": sha256_path(op.source)[:12],
        "search_space": digest(search),
        "tool_versions": digest(tool_versions()),
        "hardware": hardware_fingerprint()[:12],
    }


def _changed(plan: Plan) -> str:
    """What differs from the last check, for the log and the reason: e.g. ``source_sha256``."""
    if plan.stored_key is None:
        return "first nightly check"
    if plan.stored_key == plan.key:
        return "nothing changed, forced check"
    old = plan.stored_inputs or {}
    parts = sorted(k for k, v in plan.inputs.items() if old.get(k) != v)
    if old and parts:
        return ", ".join(parts) + " changed since the last check"
    return "inputs differ from the last check (see tag " + MODEL_TAG_INPUTS + ")"


def _stored_inputs(tag: str | None) -> dict[str, str] | None:
    try:
        value = json.loads(tag) if tag else None
    except ValueError:  # truncated or hand-edited tag: the summary falls back to the generic line
        return None
    return value if isinstance(value, dict) else None


def _release(deployment: str, name: str, version: str) -> bool:
    """Start the release deployment for ``name`` ``version``; False when it is not registered."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run_deployment(
            deployment,
            parameters={"params": {"name": name, "version": version}},
            timeout=0,
            as_subflow=True,
        )
    except ObjectNotFound:
        get_run_logger().warning("release deployment %r is not registered", deployment)
        return False
    return True
