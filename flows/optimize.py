"""The optimize flow: convert -> optimize -> validate -> benchmark -> register.

The flow only wires stages together; each stage's work lives in ``tasks/<stage>/``. Stages pass
small typed objects (paths, configs, metrics), never model bytes.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field, field_validator

from bladeflow.core import registry
from bladeflow.core.contract import (
    AccuracyReport,
    BenchmarkReport,
    Candidate,
    DataRef,
    LatencyStats,
    ModelArtifact,
    OptimizeResult,
    SessionConfig,
    StageResult,
    StageStatus,
    Tolerance,
)
from bladeflow.core.environment import hardware, tool_versions
from bladeflow.core.errors import AccuracyGateError, BladeflowError, UserInputError
from bladeflow.core.faults import fault_point
from bladeflow.core.outcome import Status
from bladeflow.core.redact import redact, split_credentials
from bladeflow.core.settings import Settings
from bladeflow.tasks.benchmark.incumbent import INCUMBENT, download_version, resolve_version
from bladeflow.tasks.benchmark.latency import BenchmarkSettings, benchmark
from bladeflow.tasks.convert.dispatch import (
    ConvertOptions,
    convert_source,
    detect,
    open_source_runner,
)
from bladeflow.tasks.convert.verify import run_source
from bladeflow.tasks.optimize.base import PassContext
from bladeflow.tasks.optimize.int8_static import graph_op_types
from bladeflow.tasks.optimize.recipes import BASELINE, Recipe, build_candidate, plan_recipes
from bladeflow.tasks.register import mlflow_registry as reg
from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, predict
from bladeflow.tasks.validate.data import fixed_batch
from bladeflow.tasks.validate.gate import (
    GateOutcome,
    StepError,
    accuracy_gate,
    candidate_steps,
    validate_chain,
)
from bladeflow.tasks.validate.gx import SuiteResult
from bladeflow.tasks.validate.policy import DataPolicy, TolerancePolicy, policy_from_tolerance
from bladeflow.tasks.validate.prepare import (
    PreparedData,
    prepare_validation_data,
    read_data,
    read_labels,
)
from bladeflow.tasks.validate.report import RunResults, version_description, write_report
from bladeflow.tasks.validate.summary import (
    candidate_rows,
    candidates_markdown,
    pareto_plot,
    summary_markdown,
)

SOURCE = "source"


class BenchParams(BaseModel):
    """How long the benchmark measures each model at each batch size."""

    warmup: int = Field(5, ge=0, description="untimed runs before measuring")
    rounds: int = Field(5, ge=1, description="interleaved rounds over all models")
    iterations: int = Field(20, ge=1, description="timed runs per model per round")
    max_seconds: float = Field(10.0, gt=0, description="time cap per model and batch size")


class OptimizeParams(BaseModel):
    """Parameters of the optimize flow (the Prefect UI renders them as a form)."""

    source: str = Field(description="model file/folder/URI to optimize")
    name: str = Field(description="registered model name in MLflow")
    data: str | None = Field(
        None,
        description="validation data: .npz / folder of .npy (arrays by input name), or "
        ".parquet/.csv/.jsonl (columns = inputs, or text columns for a tokenizer)",
    )
    labels_column: str | None = Field(None, description="column with labels, for task metrics")
    text_columns: list[str] | None = Field(None, description="text column(s) to tokenize")
    calibration: str | None = Field(None, description="separate calibration data (int8 static)")
    min_rows: int = Field(1, ge=1, description="fewest validation samples accepted")
    format: str | None = Field(None, description="source format; detected from the path if unset")
    signature: str | None = Field(None, description="TensorFlow serving signature to export")
    input_shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="input -> example/fixed shape, e.g. x: [1, 3, 224, 224]"
    )
    dynamic_axes: dict[str, dict[int, str]] | None = Field(
        None, description="input/output -> axis -> dim name; default: batch (and sequence)"
    )
    target_opset: int | None = Field(None, description="ONNX opset to export or upgrade to")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    preset: str = Field("cpu", description="which candidate recipes to try")
    passes: str | None = Field(None, description="explicit recipes, e.g. 'ort_graph:level=all'")
    objective: str = Field("latency@1", description="latency@BATCH or throughput@BATCH")
    recovery_budget_s: float = Field(
        300.0, ge=0, description="time budget of accuracy recovery (mixed precision) per recipe"
    )
    tolerance: Tolerance = Field(default_factory=Tolerance)
    policy: TolerancePolicy | None = Field(
        None,
        description="full gate policy (presets, per-output overrides, task metric limit); "
        "overrides `tolerance`",
    )
    bench: BenchParams = Field(default_factory=BenchParams)
    benchmark_work_pool: str | None = Field(
        None,
        description="run the benchmark on this Prefect work pool (its workers sit on the target "
        "hardware, e.g. a GPU pool) through the benchmark-on-POOL deployment",
    )
    benchmark_timeout_s: float = Field(
        3600.0, gt=0, description="with benchmark_work_pool: how long to wait for its worker"
    )
    must_beat: str | None = Field(
        None,
        description="register only if faster than this version of the same model (a number or "
        "an alias, e.g. 'champion'), timed in the same interleaved benchmark",
    )
    min_speedup: float = Field(
        1.0, gt=0, description="with must_beat: incumbent/chosen at the objective, at least"
    )
    tracking_uri: str | None = Field(None, description="MLflow tracking URI override")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return registry.check_model_name(v)

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        # Flow parameters are stored by Prefect and shown in its UI: no passwords in them.
        if v and split_credentials(v)[2] is not None:
            raise ValueError(
                f"tracking_uri {redact(v)!r} carries a password; pass the plain URI and set "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment instead"
            )
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive integers, e.g. [1, 8, 32]")
        return sorted(set(v))

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        parse_objective(v)
        return v


def parse_objective(objective: str) -> tuple[str, int]:
    """``latency@1`` -> ("latency", 1); ``throughput@32`` -> ("throughput", 32)."""
    kind, _, batch = objective.partition("@")
    if kind not in {"latency", "throughput"} or not batch.isdigit() or int(batch) < 1:
        raise UserInputError(
            f"objective {objective!r} is not valid: use latency@BATCH or throughput@BATCH, "
            "e.g. latency@1"
        )
    return kind, int(batch)


# ---------------------------------------------------------------------------------------------
# Tasks: thin wrappers that give each stage a name, a log line and (for I/O) retries.


def convert_options(params: OptimizeParams) -> ConvertOptions:
    """The convert stage's options from the flow parameters."""
    return ConvertOptions(
        format=params.format,
        signature=params.signature,
        input_shapes=params.input_shapes,
        dynamic_axes=params.dynamic_axes,
        target_opset=params.target_opset,
    )


@task(name="convert")
def convert_task(source: str, options: ConvertOptions, workdir: Path) -> ModelArtifact:
    kind = detect(source, options.format)
    get_run_logger().info(
        "convert: %s model %s -> ONNX (verified against the source)", kind, source
    )
    return convert_source(source, workdir, options)


@task(name="prepare-data")
def prepare_data_task(model: ModelArtifact, params: OptimizeParams, workdir: Path) -> PreparedData:
    prepared = prepare_validation_data(
        model,
        params.data,
        workdir,
        labels_column=params.labels_column,
        text_columns=params.text_columns,
        calibration=params.calibration,
        policy=DataPolicy(min_rows=params.min_rows),
    )
    get_run_logger().info("data: %s", prepared.description or prepared.data.path)
    return prepared


@task(name="build-candidate", task_run_name="build-{recipe.name}")
def build_candidate_task(
    recipe: Recipe, model: ModelArtifact, workdir: Path, context: PassContext
) -> Candidate:
    return build_candidate(recipe, model, workdir, context)


@task(name="reference-outputs")
def reference_task(
    source: str, options: ConvertOptions, model: ModelArtifact, data: DataRef, workdir: Path
) -> str:
    """Outputs of the source on the validation data: its own framework when it has one (so every
    candidate is judged against the original model, conversion error included), else the ONNX
    graph run literally (no ONNX Runtime graph optimizations)."""
    runner = open_source_runner(source, options, model)
    arrays = read_data(data)
    if runner is not None:
        get_run_logger().info("reference: running the source in %s", runner.name)
        outputs = run_source(runner, arrays, fixed_batch(model.signature) or 32)
    else:
        outputs = predict(model, REFERENCE_SESSION, arrays)
    path = workdir / "reference_outputs.npz"
    np.savez(path, **outputs)  # type: ignore[arg-type]  # numpy's stub types **kwds too narrowly
    return str(path)


@task(name="validate", task_run_name="validate-{candidate.name}", persist_result=False)
def validate_task(
    candidate: Candidate,
    reference: str,
    prepared: PreparedData,
    policy: TolerancePolicy,
    gx_dir: Path,
) -> GateOutcome:
    """The accuracy gate for one candidate: a GX suite over its per-sample errors."""
    with np.load(reference, allow_pickle=False) as npz:
        ref = {k: npz[k] for k in npz.files}
    outputs = predict(candidate.artifact, candidate.session, read_data(prepared.data))
    outcome = accuracy_gate(
        candidate.name,
        outputs,
        ref,
        policy,
        prepared.data.synthetic,
        labels=read_labels(prepared),
        gx_dir=gx_dir,
    )
    report = outcome.report
    get_run_logger().info(
        "validate: %s %s%s",
        candidate.name,
        "passed" if report.passed else "FAILED",
        "" if report.passed else f" ({report.reason})",
    )
    return outcome


@task(name="benchmark")
def benchmark_task(
    source: str,
    options: ConvertOptions,
    model: ModelArtifact,
    candidates: dict[str, tuple[ModelArtifact, SessionConfig]],
    data: DataRef,
    batch_sizes: list[int],
    settings: BenchParams,
) -> tuple[BenchmarkReport, str]:
    """Time the source (in its own framework when it has one) and every passing candidate."""
    logger = get_run_logger()
    runner = open_source_runner(source, options, model)
    models = dict(candidates)
    runners = {}
    if runner is not None:
        runners[SOURCE] = runner
        source_runtime = runner.name
    else:
        models = {SOURCE: (model, SessionConfig()), **models}
        source_runtime = "onnxruntime (default session)"
    report = benchmark(
        models,
        read_data(data),
        batch_sizes,
        BenchmarkSettings(**settings.model_dump()),
        progress=logger.info,
        runners=runners,
    )
    return report, source_runtime


@task(name="benchmark-on-pool")
def remote_benchmark_task(
    settings: Settings,
    run_id: str,
    params: OptimizeParams,
    model: ModelArtifact,
    candidates: dict[str, tuple[ModelArtifact, SessionConfig]],
    data: DataRef,
    batch_sizes: list[int],
    workdir: Path,
) -> tuple[BenchmarkReport, str]:
    """Upload models + data to the MLflow run, benchmark them on the pool's worker, read back."""
    from bladeflow.flows.benchmark import REMOTE_DIR, BenchmarkRequest, RemoteModel, run_remote

    pool = params.benchmark_work_pool
    assert pool is not None
    logger = get_run_logger()
    stage = workdir / REMOTE_DIR
    models = {SOURCE: (model, SessionConfig()), **candidates}
    remote = {}
    for label, (artifact, session) in models.items():
        folder = stage / "models" / label
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact.path, folder / "model.onnx")
        remote[label] = RemoteModel(
            artifact_path=f"{REMOTE_DIR}/models/{label}/model.onnx", session=session
        )
    shutil.copyfile(data.path, stage / "data.npz")
    reg.log_artifacts(settings, run_id, stage, REMOTE_DIR)
    request = BenchmarkRequest(
        tracking_uri=settings.tracking_uri,
        run_id=run_id,
        models=remote,
        data_path=f"{REMOTE_DIR}/data.npz",
        batch_sizes=batch_sizes,
        report_path=f"{REMOTE_DIR}/{uuid.uuid4().hex[:8]}",
        **params.bench.model_dump(),
    )
    logger.info("benchmark: %d models sent to work pool %r", len(models), pool)
    report, where = run_remote(request, pool, params.benchmark_timeout_s)
    with reg.mlflow_errors(settings, "tagging the run with the benchmark's hardware"):
        c = reg.client(settings)
        c.set_tag(run_id, "bladeflow.benchmark_pool", pool)
        c.set_tag(run_id, "bladeflow.benchmark_hardware", json.dumps(where, sort_keys=True))
    return report, f"onnxruntime (default session) on work pool {pool!r}: {where.get('cpu')}"


@task(name="start-mlflow-run", retries=2, retry_delay_seconds=[2, 5])
def start_run_task(settings: Settings, name: str, params: dict[str, Any]) -> str:
    return reg.start_run(settings, name, params)


@task(
    name="register",
    retries=2,
    retry_delay_seconds=[2, 5],
    retry_condition_fn=lambda task, run, state: (
        not isinstance(state.result(raise_on_failure=False), UserInputError)
    ),
)
def register_task(
    settings: Settings,
    run_id: str,
    name: str,
    candidate: Candidate,
    tags: dict[str, str],
    description: str,
    input_example: dict[str, np.ndarray] | None,
) -> tuple[str, str]:
    version, uri = reg.register(settings, run_id, name, candidate, tags, description, input_example)
    get_run_logger().info(
        "register: %s is version %s of %r (alias %r)", uri, version, name, registry.ALIAS_CANDIDATE
    )
    return version, uri


# ---------------------------------------------------------------------------------------------


@flow(name="optimize")
def optimize_flow(params: OptimizeParams) -> OptimizeResult:
    """Convert, optimize, validate, benchmark and register one model.

    Raises:
        UserInputError: the source, data or options cannot be used (nothing is registered).
        AccuracyGateError: no candidate passed the accuracy gate (nothing gets an alias).
    """
    settings = Settings.from_env().with_tracking_uri(params.tracking_uri)
    run_dir = (
        settings.workdir / f"{params.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    reports_dir = run_dir / "reports"
    reports_dir.mkdir(parents=True, exist_ok=True)
    stages: list[StageResult] = []
    kind, objective_batch = parse_objective(params.objective)
    batch_sizes = sorted({*params.batch_sizes, objective_batch})
    # Checked before any work: a wrong must_beat is a usage error, not a late surprise.
    incumbent = None
    if params.must_beat:
        incumbent = resolve_version(settings, params.name, params.must_beat)

    options = convert_options(params)
    with _stage(stages, "convert"):
        model = convert_task(params.source, options, run_dir / "converted")
    with _stage(stages, "prepare-data"):
        prepared = prepare_data_task(model, params, run_dir)
    data = prepared.data
    policy = params.policy or policy_from_tolerance(params.tolerance)
    (reports_dir / "gx").mkdir(exist_ok=True)
    for check in prepared.checks:  # the data checks' GX results go to MLflow with the report
        shutil.copy(check, reports_dir / "gx" / Path(check).name)
    plan = plan_recipes(params.preset, params.passes, op_types=graph_op_types(model.path))
    recipes = plan.recipes

    run_id = start_run_task(
        settings,
        params.name,
        {
            **params.model_dump(exclude={"tolerance", "bench", "tracking_uri", "policy"}),
            "policy": policy.model_dump(mode="json"),
            "recipes": [r.model_dump(mode="json") for r in recipes],
            "skipped_recipes": plan.skipped,
            "source_sha256": model.provenance.parent_sha256,
            "synthetic_data": data.synthetic,
            "hardware": hardware(),
        },
    )
    try:
        with _stage(stages, "optimize") as st:
            # The reference comes first: accuracy recovery searches against it while it builds.
            reference = reference_task(params.source, options, model, data, run_dir)
            context = PassContext(
                data=data,
                reference_path=reference,
                tolerance=params.tolerance,
                time_budget_s=params.recovery_budget_s,
            )
            candidates, build_failures = _build_all(recipes, model, run_dir / "candidates", context)
            st.outputs = {
                "candidates": [c.name for c in candidates],
                "failed": build_failures,
                "skipped": plan.skipped,
            }

        with _stage(stages, "validate") as st:
            futures = [
                validate_task.submit(c, reference, prepared, policy, reports_dir / "gx")
                for c in candidates
            ]
            outcomes = {c.name: f.result() for c, f in zip(candidates, futures, strict=True)}
            accuracy = {n: o.report for n, o in outcomes.items()}
            not_built = {n: (Status.FAILED, f"pass failed: {r}") for n, r in build_failures.items()}
            not_built.update({n: (Status.SKIPPED, r) for n, r in plan.skipped.items()})
            for name, (status, reason) in not_built.items():
                accuracy[name] = AccuracyReport(
                    candidate=name,
                    passed=False,
                    outputs={},
                    reason=reason,
                    synthetic_data=data.synthetic,
                    status=status,
                )
            passing = [c for c in candidates if accuracy[c.name].passed]
            st.outputs = {"passed": [c.name for c in passing]}
            st.metrics = {f"{n}.passed": float(a.passed) for n, a in accuracy.items()}

        reg.log_metrics(settings, run_id, _accuracy_metrics(accuracy))
        if not passing:
            _log_candidates(
                settings, run_id, recipes, accuracy, None, None, objective_batch, reports_dir
            )
            reasons = {n: a.reason for n, a in accuracy.items()}
            (reports_dir / "accuracy.json").write_text(_dump_json(accuracy))
            (reports_dir / "candidates.md").write_text(
                candidates_markdown(accuracy, None, None, objective_batch)
            )
            _full_report(params, reports_dir, {**accuracy, **outcomes}, None, None, prepared, [])
            reg.log_artifacts(settings, run_id, reports_dir, "reports")
            raise AccuracyGateError(
                "no candidate passed the accuracy gate ("
                + "; ".join(f"{n}: {r}" for n, r in reasons.items())
                + "). Nothing was registered. "
                "Loosen the tolerance (--atol/--rtol/--min-cosine) only if these errors are "
                "acceptable for your task.",
                reasons,
                run_id,
            )

        with _stage(stages, "benchmark") as st:
            timed = {c.name: (c.artifact, c.session) for c in passing}
            if incumbent is not None:  # timed in the same rounds: the only fair comparison
                timed[INCUMBENT] = incumbent_task(
                    settings, params.name, incumbent, run_dir / INCUMBENT
                )
            if params.benchmark_work_pool:
                bench, source_runtime = remote_benchmark_task(
                    settings, run_id, params, model, timed, data, batch_sizes, run_dir
                )
            else:
                bench, source_runtime = benchmark_task(
                    params.source, options, model, timed, data, batch_sizes, params.bench
                )
            chosen = _select(passing, bench, kind, objective_batch)
            st.outputs = {"chosen": chosen.name}

        _log_candidates(
            settings, run_id, recipes, accuracy, bench, chosen.name, objective_batch, reports_dir
        )
        result = _result(params, settings, run_id, chosen, accuracy, bench, data, stages)
        result.source_runtime = source_runtime
        candidates_md = candidates_markdown(accuracy, bench, chosen.name, objective_batch)
        summary = summary_markdown(result, candidates_md, params.source)
        _write_reports(reports_dir, accuracy, bench, candidates_md, summary, stages)
        chain = _chain(model, chosen, run_dir, prepared, policy, reference)
        report_md = _full_report(
            params,
            reports_dir,
            {**accuracy, **outcomes},
            chosen,
            bench,
            prepared,
            chain,
            source_runtime,
        )
        reg.log_metrics(settings, run_id, _latency_metrics(bench, result))
        reg.log_artifacts(settings, run_id, reports_dir, "reports")
        if incumbent is not None:
            result = _judge_incumbent(settings, run_id, params, result, bench, incumbent)
            if result.outcome == "not_improved":
                return result

        with _stage(stages, "register"):
            # Passes rewrite the graph, not the tokenizer: ship the converted model's assets.
            chosen = chosen.model_copy(
                update={"artifact": chosen.artifact.model_copy(update={"assets": model.assets})}
            )
            tags = _version_tags(params, model, chosen, data)
            example = {k: v[:1] for k, v in read_data(data).items()}
            version, uri = register_task(
                settings,
                run_id,
                params.name,
                chosen,
                tags,
                version_description(report_md),
                example,
            )
        result = result.model_copy(update={"version": version, "model_uri": uri, "stages": stages})
        create_markdown_artifact(
            report_md + "\n\n## Candidates\n\n" + candidates_md,
            key="optimize-report",
            description=f"{params.name} v{version}",
        )
        reg.end_run(
            settings,
            run_id,
            "FINISHED",
            {"bladeflow.outcome": "registered", "bladeflow.version": version},
        )
        return result
    except AccuracyGateError as exc:
        reg.end_run(
            settings,
            run_id,
            "FAILED",
            {"bladeflow.outcome": "accuracy_gate_failed", "bladeflow.reason": str(exc)[:5000]},
            quiet=True,
        )
        raise
    except BaseException as exc:
        reg.end_run(
            settings,
            run_id,
            "FAILED",
            {"bladeflow.outcome": "error", "bladeflow.reason": str(exc)[:5000]},
            quiet=True,
        )
        raise


def _chain(
    model: ModelArtifact,
    chosen: Candidate,
    run_dir: Path,
    prepared: PreparedData,
    policy: TolerancePolicy,
    reference: str,
) -> list[StepError]:
    """Error each pass of the chosen recipe introduced (the baseline has no passes)."""
    recipe_dir = run_dir / "candidates" / chosen.name
    if not chosen.recipe or not recipe_dir.is_dir():
        return []
    with np.load(reference, allow_pickle=False) as npz:
        ref = {k: npz[k] for k in npz.files}
    steps = candidate_steps(chosen, recipe_dir)
    return validate_chain(model, steps, read_data(prepared.data), policy, reference=ref)


def _full_report(
    params: OptimizeParams,
    reports_dir: Path,
    accuracy: dict[str, Any],
    chosen: Candidate | None,
    bench: BenchmarkReport | None,
    prepared: PreparedData,
    chain: list[StepError],
    source_runtime: str = "source",
) -> str:
    """Write the human report (Markdown + HTML + plots + GX JSON) and return its Markdown."""
    suite = SuiteResult.load(Path(prepared.checks[0])) if prepared.checks else None
    files = write_report(
        reports_dir / "report",
        RunResults(
            name=params.name,
            source=params.source,
            synthetic_data=prepared.data.synthetic,
            accuracy=accuracy,
            chosen=chosen.name if chosen else None,
            recipe=chosen.recipe if chosen else [],
            session=chosen.session if chosen else None,
            benchmark=bench,
            source_label=SOURCE,
            chain=chain,
            data_description=prepared.description,
            data_suite=suite,
        ),
    )
    return Path(files.markdown).read_text()


def _log_candidates(
    settings: Settings,
    run_id: str,
    recipes: list[Recipe],
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport | None,
    chosen: str | None,
    objective_batch: int,
    reports_dir: Path,
) -> None:
    """Nested MLflow run per candidate, the Pareto plot, and the Prefect candidate table."""
    by_name = {r.name: r for r in recipes}
    for name, acc in accuracy.items():
        metrics = {
            f"accuracy.{out}.{k}": getattr(a, k)
            for out, a in acc.outputs.items()
            for k in ("max_abs_error", "max_rel_error", "min_cosine", "mean_cosine")
        }
        for bs, s in (bench.models.get(name, {}) if bench else {}).items():
            metrics.update(
                {
                    f"latency.b{bs}.p50_ms": s.p50_ms,
                    f"latency.b{bs}.p99_ms": s.p99_ms,
                    f"throughput.b{bs}": s.throughput,
                }
            )
        recipe = by_name.get(name)
        params = {
            "recipe": [p.model_dump(mode="json") for p in recipe.passes] if recipe else [],
            "session": recipe.session.model_dump(mode="json") if recipe else {},
        }
        decision = "chosen" if name == chosen else ("passed" if acc.passed else "rejected")
        reg.log_candidate_run(
            settings,
            run_id,
            name,
            params,
            metrics,
            {"bladeflow.gate": decision, "bladeflow.reason": acc.reason[:5000]},
        )
    pareto_plot(accuracy, bench, chosen, objective_batch, reports_dir / "pareto.png")
    create_table_artifact(
        candidate_rows(accuracy, bench, chosen, objective_batch),
        key="optimize-candidates",
        description="Every candidate, its accuracy-gate verdict, latency and why it was chosen "
        "or rejected.",
    )


@contextmanager
def _stage(stages: list[StageResult], name: str) -> Iterator[StageResult]:
    fault_point(name)  # no-op unless a reliability test asks to pause here (bladeflow/faults.py)
    result = StageResult(stage=name, status=StageStatus.OK, elapsed_s=0.0)
    started = time.perf_counter()
    try:
        yield result
    except BaseException as exc:
        result.status = StageStatus.FAILED
        result.reason = str(exc)
        raise
    finally:
        result.elapsed_s = round(time.perf_counter() - started, 3)
        stages.append(result)


def _build_all(
    recipes: list[Recipe], model: ModelArtifact, workdir: Path, context: PassContext
) -> tuple[list[Candidate], dict[str, str]]:
    """Build every candidate through the task runner; a pass that fails rejects its candidate."""
    futures = [(r, build_candidate_task.submit(r, model, workdir, context)) for r in recipes]
    built, failed = [], {}
    for recipe, fut in futures:
        state = fut.wait() or fut.state
        if state.is_completed():
            built.append(fut.result())
            continue
        exc = state.result(raise_on_failure=False)
        if recipe.name == BASELINE:  # the unoptimized model must always be a candidate
            raise exc if isinstance(exc, BaseException) else RuntimeError(str(exc))
        failed[recipe.name] = f"{type(exc).__name__}: {exc}"
    return built, failed


@task(name="download-incumbent", retries=2, retry_delay_seconds=[2, 5])
def incumbent_task(
    settings: Settings, name: str, version: str, folder: Path
) -> tuple[ModelArtifact, SessionConfig]:
    return download_version(settings, name, version, folder)


def _judge_incumbent(
    settings: Settings,
    run_id: str,
    params: OptimizeParams,
    result: OptimizeResult,
    bench: BenchmarkReport,
    incumbent: str,
) -> OptimizeResult:
    """Speedup of the chosen candidate over the incumbent; ends the run when it is too small."""
    kind, batch = parse_objective(params.objective)

    def at(label: str) -> LatencyStats:
        per = bench.models[label]
        return per.get(batch) or per[min(per)]

    new, old = at(result.candidate), at(INCUMBENT)
    if kind == "latency":
        speedup = old.p50_ms / new.p50_ms if new.p50_ms else 0.0
    else:
        speedup = new.throughput / old.throughput if old.throughput else 0.0
    reg.log_metrics(settings, run_id, {"speedup_vs_incumbent": speedup})
    result = result.model_copy(
        update={"incumbent_version": incumbent, "incumbent_speedup": round(speedup, 3)}
    )
    if speedup >= params.min_speedup:
        return result
    reason = (
        f"{result.candidate} is x{speedup:.2f} v{incumbent} at {params.objective}, below "
        f"min_speedup {params.min_speedup}: nothing registered"
    )
    get_run_logger().info("register: skipped, %s", reason)
    result.stages.append(
        StageResult(stage="register", status=StageStatus.SKIPPED, elapsed_s=0.0, reason=reason)
    )
    reg.end_run(
        settings,
        run_id,
        "FINISHED",
        {"bladeflow.outcome": "not_improved", "bladeflow.reason": reason},
    )
    return result.model_copy(update={"outcome": "not_improved", "version": "", "model_uri": ""})


def _select(passing: list[Candidate], bench: BenchmarkReport, kind: str, batch: int) -> Candidate:
    """The best candidate on the objective; ties go to the earlier (simpler) recipe.

    Candidates more than 10% slower than the unoptimized baseline at another measured batch size
    are not eligible (the baseline itself always is), so the choice never regresses a batch size
    the user asked to measure for a win at the objective's.
    """

    def score(c: Candidate) -> float:
        per = bench.models[c.name]
        stats = per.get(batch) or per[min(per)]
        return stats.p50_ms if kind == "latency" else -stats.throughput

    eligible = [c for c in passing if not bench.slower_than(c.name, BASELINE, skip=[batch])]
    return min(eligible or passing, key=score)


def _result(
    params: OptimizeParams,
    settings: Settings,
    run_id: str,
    chosen: Candidate,
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport,
    data: DataRef,
    stages: list[StageResult],
) -> OptimizeResult:
    src, opt = bench.models[SOURCE], bench.models[chosen.name]
    return OptimizeResult(
        name=params.name,
        version="pending",
        model_uri="",
        run_id=run_id,
        candidate=chosen.name,
        recipe=chosen.recipe,
        session=chosen.session,
        accuracy=accuracy[chosen.name].outputs,
        latency_ms={"source": src, "chosen": opt},
        throughput={
            "source": {b: s.throughput for b, s in src.items()},
            "chosen": {b: s.throughput for b, s in opt.items()},
        },
        speedup={b: (src[b].p50_ms / opt[b].p50_ms if opt[b].p50_ms else 0.0) for b in opt},
        synthetic_data=data.synthetic,
        stages=stages,
    )


def _version_tags(
    params: OptimizeParams, model: ModelArtifact, chosen: Candidate, data: DataRef
) -> dict[str, str]:
    source = params.source
    if Path(source).exists():
        source = str(Path(source).resolve())
    steps = [s for s in (model.provenance.step,) if s is not None] + chosen.recipe
    return {
        registry.TAG_SOURCE: source,
        registry.TAG_SOURCE_SHA256: model.provenance.parent_sha256 or "",
        registry.TAG_RECIPE: registry.recipe_json(steps, chosen.session),
        registry.TAG_VALIDATED: "true",
        registry.TAG_HARDWARE: json.dumps(hardware(), sort_keys=True),
        registry.TAG_CANDIDATE: chosen.name,
        registry.TAG_SYNTHETIC: str(data.synthetic).lower(),
        registry.TAG_OPTIMIZE_PARAMS: redact(params.model_dump_json(exclude={"tracking_uri"}))[
            :5000
        ],
        registry.TAG_TOOL_VERSIONS: json.dumps(tool_versions(), sort_keys=True),
    }


def _accuracy_metrics(accuracy: dict[str, AccuracyReport]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for cand, rep in accuracy.items():
        metrics[f"accuracy.{cand}.passed"] = float(rep.passed)
        for out, acc in rep.outputs.items():
            for key in ("max_abs_error", "max_rel_error", "min_cosine", "mean_cosine"):
                metrics[f"accuracy.{cand}.{out}.{key}"] = getattr(acc, key)
    return metrics


def _latency_metrics(bench: BenchmarkReport, result: OptimizeResult) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for label, per in bench.models.items():
        for bs, s in per.items():
            for key in ("p50_ms", "p90_ms", "p99_ms", "throughput"):
                metrics[f"latency.{label}.b{bs}.{key}"] = getattr(s, key)
    for bs, ratio in result.speedup.items():
        metrics[f"speedup.b{bs}"] = ratio
    return metrics


def _write_reports(
    folder: Path,
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport,
    candidates_md: str,
    summary: str,
    stages: list[StageResult],
) -> None:
    (folder / "accuracy.json").write_text(_dump_json(accuracy))
    (folder / "benchmark.json").write_text(bench.model_dump_json(indent=2))
    (folder / "candidates.md").write_text(candidates_md)
    (folder / "summary.md").write_text(summary)
    (folder / "stages.json").write_text(
        json.dumps([s.model_dump(mode="json") for s in stages], indent=2)
    )


def _dump_json(reports: dict[str, AccuracyReport]) -> str:
    return json.dumps({k: v.model_dump(mode="json") for k, v in reports.items()}, indent=2)


__all__ = ["BladeflowError", "OptimizeParams", "optimize_flow"]
