"""The optimize flow: convert -> optimize -> validate -> benchmark -> register.

The flow only wires stages together; each stage's work lives in ``tasks/<stage>/``. Stages pass
small typed objects (paths, configs, metrics), never model bytes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field, field_validator

from bladeflow import registry
from bladeflow.contract import (
    AccuracyReport,
    BenchmarkReport,
    Candidate,
    DataRef,
    ModelArtifact,
    OptimizeResult,
    SessionConfig,
    StageResult,
    StageStatus,
    Tolerance,
)
from bladeflow.environment import hardware
from bladeflow.errors import AccuracyGateError, BladeflowError, UserInputError
from bladeflow.report import candidates_markdown, summary_markdown
from bladeflow.settings import Settings
from tasks.benchmark.latency import BenchmarkSettings, benchmark
from tasks.convert.detect import detect_format
from tasks.convert.onnx_source import load_onnx_source
from tasks.optimize.recipes import BASELINE, Recipe, build_candidate, resolve_recipes
from tasks.register import mlflow_registry as reg
from tasks.validate.accuracy import REFERENCE_SESSION, compare, predict
from tasks.validate.prepare import prepare_data, read_data

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
    data: str | None = Field(None, description=".npz of validation inputs by input name")
    format: str | None = Field(None, description="source format; detected from the path if unset")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    preset: str = Field("cpu", description="which candidate recipes to try")
    passes: str | None = Field(None, description="explicit recipes, e.g. 'ort_graph:level=all'")
    objective: str = Field("latency@1", description="latency@BATCH or throughput@BATCH")
    tolerance: Tolerance = Field(default_factory=Tolerance)
    bench: BenchParams = Field(default_factory=BenchParams)
    tracking_uri: str | None = Field(None, description="MLflow tracking URI override")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return registry.check_model_name(v)

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


@task(name="convert")
def convert_task(source: str, fmt: str | None, workdir: Path) -> ModelArtifact:
    kind = detect_format(source, fmt)
    get_run_logger().info("convert: admitting %s model %s", kind, source)
    return load_onnx_source(source, workdir)


@task(name="prepare-data")
def prepare_data_task(model: ModelArtifact, data: str | None, workdir: Path) -> DataRef:
    ref = prepare_data(model, data, workdir)
    get_run_logger().info(
        "data: %d samples (%s)", ref.samples, "synthetic" if ref.synthetic else data
    )
    return ref


@task(name="build-candidate", task_run_name="build-{recipe.name}")
def build_candidate_task(recipe: Recipe, model: ModelArtifact, workdir: Path) -> Candidate:
    return build_candidate(recipe, model, workdir)


@task(name="reference-outputs")
def reference_task(model: ModelArtifact, data: DataRef, workdir: Path) -> str:
    outputs = predict(model, REFERENCE_SESSION, read_data(data))
    path = workdir / "reference_outputs.npz"
    np.savez(path, **outputs)  # type: ignore[arg-type]  # numpy's stub types **kwds too narrowly
    return str(path)


@task(name="validate", task_run_name="validate-{candidate.name}")
def validate_task(
    candidate: Candidate, reference: str, data: DataRef, tolerance: Tolerance
) -> AccuracyReport:
    with np.load(reference, allow_pickle=False) as npz:
        ref = {k: npz[k] for k in npz.files}
    outputs = predict(candidate.artifact, candidate.session, read_data(data))
    report = compare(candidate.name, outputs, ref, tolerance, data.synthetic)
    get_run_logger().info(
        "validate: %s %s%s",
        candidate.name,
        "passed" if report.passed else "FAILED",
        "" if report.passed else f" ({report.reason})",
    )
    return report


@task(name="benchmark")
def benchmark_task(
    models: dict[str, tuple[ModelArtifact, SessionConfig]],
    data: DataRef,
    batch_sizes: list[int],
    settings: BenchParams,
) -> BenchmarkReport:
    logger = get_run_logger()
    return benchmark(
        models,
        read_data(data),
        batch_sizes,
        BenchmarkSettings(**settings.model_dump()),
        progress=logger.info,
    )


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

    with _stage(stages, "convert"):
        model = convert_task(params.source, params.format, run_dir / "converted")
    with _stage(stages, "prepare-data"):
        data = prepare_data_task(model, params.data, run_dir)
    recipes = resolve_recipes(params.preset, params.passes)

    run_id = start_run_task(
        settings,
        params.name,
        {
            **params.model_dump(exclude={"tolerance", "bench", "tracking_uri"}),
            **{f"tolerance.{k}": v for k, v in params.tolerance.model_dump().items()},
            "recipes": [r.model_dump(mode="json") for r in recipes],
            "source_sha256": model.provenance.parent_sha256,
            "synthetic_data": data.synthetic,
            "hardware": hardware(),
        },
    )
    try:
        with _stage(stages, "optimize") as st:
            candidates, build_failures = _build_all(recipes, model, run_dir / "candidates")
            st.outputs = {"candidates": [c.name for c in candidates], "failed": build_failures}

        with _stage(stages, "validate") as st:
            reference = reference_task(model, data, run_dir)
            futures = [
                validate_task.submit(c, reference, data, params.tolerance) for c in candidates
            ]
            accuracy = {c.name: f.result() for c, f in zip(candidates, futures, strict=True)}
            for name, reason in build_failures.items():
                accuracy[name] = AccuracyReport(
                    candidate=name,
                    passed=False,
                    outputs={},
                    reason=f"pass failed: {reason}",
                    synthetic_data=data.synthetic,
                )
            passing = [c for c in candidates if accuracy[c.name].passed]
            st.outputs = {"passed": [c.name for c in passing]}
            st.metrics = {f"{n}.passed": float(a.passed) for n, a in accuracy.items()}

        reg.log_metrics(settings, run_id, _accuracy_metrics(accuracy))
        if not passing:
            reasons = {n: a.reason for n, a in accuracy.items()}
            (reports_dir / "accuracy.json").write_text(_dump_json(accuracy))
            (reports_dir / "candidates.md").write_text(
                candidates_markdown(accuracy, None, None, objective_batch)
            )
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
            models = {SOURCE: (model, SessionConfig())}
            models.update({c.name: (c.artifact, c.session) for c in passing})
            bench = benchmark_task(models, data, batch_sizes, params.bench)
            chosen = _select(passing, bench, kind, objective_batch)
            st.outputs = {"chosen": chosen.name}

        result = _result(params, settings, run_id, chosen, accuracy, bench, data, stages)
        candidates_md = candidates_markdown(accuracy, bench, chosen.name, objective_batch)
        summary = summary_markdown(result, candidates_md, params.source)
        _write_reports(reports_dir, accuracy, bench, candidates_md, summary, stages)
        reg.log_metrics(settings, run_id, _latency_metrics(bench, result))
        reg.log_artifacts(settings, run_id, reports_dir, "reports")

        with _stage(stages, "register"):
            tags = _version_tags(params, model, chosen, data)
            example = {k: v[:1] for k, v in read_data(data).items()}
            version, uri = register_task(
                settings, run_id, params.name, chosen, tags, summary, example
            )
        result = result.model_copy(update={"version": version, "model_uri": uri, "stages": stages})
        create_markdown_artifact(
            summary, key="optimize-summary", description=f"{params.name} v{version}"
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
        )
        raise
    except BaseException as exc:
        reg.end_run(
            settings,
            run_id,
            "FAILED",
            {"bladeflow.outcome": "error", "bladeflow.reason": str(exc)[:5000]},
        )
        raise


@contextmanager
def _stage(stages: list[StageResult], name: str) -> Iterator[StageResult]:
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
    recipes: list[Recipe], model: ModelArtifact, workdir: Path
) -> tuple[list[Candidate], dict[str, str]]:
    """Build every candidate in parallel; a pass that fails rejects its candidate only."""
    futures = [(r, build_candidate_task.submit(r, model, workdir)) for r in recipes]
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


def _select(passing: list[Candidate], bench: BenchmarkReport, kind: str, batch: int) -> Candidate:
    """The best candidate on the objective; ties go to the earlier (simpler) recipe."""

    def score(c: Candidate) -> float:
        per = bench.models[c.name]
        stats = per.get(batch) or per[min(per)]
        return stats.p50_ms if kind == "latency" else -stats.throughput

    return min(passing, key=score)


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
