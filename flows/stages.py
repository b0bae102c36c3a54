"""The optimize flow's Prefect tasks: each stage's work under a name, a log line and retries.

The work itself lives in ``tasks/<stage>/``; these wrappers only give Prefect something to track.
I/O against MLflow retries (``retries=2``); model work does not (it would fail the same way).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from pydantic import BaseModel

from bladeflow.core import registry
from bladeflow.core.contract import (
    BenchmarkReport,
    Candidate,
    DataRef,
    ModelArtifact,
    SessionConfig,
)
from bladeflow.core.errors import UserInputError
from bladeflow.core.params import BenchParams, Objective, OptimizeParams
from bladeflow.core.policy import DataPolicy, TolerancePolicy
from bladeflow.core.settings import Settings
from bladeflow.tasks.benchmark.baseline import (
    candidate_threads,
    plan_source,
    settle,
    torch_threads_kept,
)
from bladeflow.tasks.benchmark.incumbent import download_version
from bladeflow.tasks.benchmark.latency import BenchmarkSettings, MoreRounds, benchmark
from bladeflow.tasks.benchmark.select import more_rounds
from bladeflow.tasks.convert.dispatch import (
    ConvertOptions,
    convert_source,
    detect,
    open_source_runner,
)
from bladeflow.tasks.convert.verify import run_source
from bladeflow.tasks.optimize.base import PassContext
from bladeflow.tasks.optimize.recipes import Recipe, build_candidate
from bladeflow.tasks.optimize.session import physical_cores
from bladeflow.tasks.register import mlflow_registry as reg
from bladeflow.tasks.register.run_report import SOURCE
from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, predict
from bladeflow.tasks.validate.data import fixed_batch, mask_padding
from bladeflow.tasks.validate.gate import GateOutcome, accuracy_gate
from bladeflow.tasks.validate.prepare import (
    PreparedData,
    prepare_validation_data,
    read_data,
    read_labels,
)

Timed = dict[str, tuple[ModelArtifact, SessionConfig]]


class Decision(BaseModel):
    """The timing decision the benchmark must make significant: which candidate wins (and, with
    an incumbent, whether it beats it by ``min_speedup``)."""

    passing: list[Candidate]
    objective: Objective
    incumbent: str | None = None
    min_speedup: float = 1.0
    planned_rounds: int | None = None  # set when rounds are added until decided (sequential)

    def more_rounds(self) -> MoreRounds:
        return more_rounds(
            self.passing, self.objective, self.incumbent, self.min_speedup, self.planned_rounds
        )


def convert_options(params: OptimizeParams) -> ConvertOptions:
    """The convert stage's options from the flow parameters."""
    return ConvertOptions(
        format=params.format,
        signature=params.signature,
        input_shapes=params.input_shapes,
        dynamic_axes=params.dynamic_axes,
        target_opset=params.target_opset,
        weights=params.weights,
        keep_initializer_inputs=params.keep_initializer_inputs,
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
    candidate = build_candidate(recipe, model, workdir, context)
    if note := precision_note(Path(workdir) / recipe.name):
        get_run_logger().info("optimize: built %s: %s", recipe.name, note)
    return candidate


def precision_note(recipe_dir: Path) -> str | None:
    """What accuracy recovery kept, from its pass details: e.g. ``int8_dynamic: 0/25 nodes kept
    fp32, 9 token-wise int8``; None for recipes without recovery."""
    for config in sorted(recipe_dir.glob("*/pass_config.json")):
        try:
            details = json.loads(config.read_text()).get("details") or {}
        except (OSError, ValueError):
            continue
        if "fp32_nodes" not in details:
            continue
        tokenwise = len(details.get("tokenwise_nodes") or [])
        note = (
            f"{details.get('precision', 'int8')}: {len(details['fp32_nodes'])}/"
            f"{details.get('candidate_nodes', '?')} nodes kept fp32"
            + (f", {tokenwise} token-wise int8" if tokenwise else "")
        )
        # Recovery aims inside the gate (its margin); missing that aim is not a rejection: the
        # validate stage's gate decides.
        return note + ("" if details.get("passed_gate", True) else ", short of recovery's margin")
    return None


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


@task(name="validate", task_run_name="validate-{twin.name}", persist_result=False)
def twin_task(
    twin: Candidate, leader: Candidate, prepared: PreparedData, leader_passed: bool
) -> int | None:
    """Rows on which ``twin`` (``leader``'s graph under other thread settings) gave bitwise the
    same outputs as ``leader``, whose verdict it then shares; None when they differ (then it is
    validated in full)."""
    from bladeflow.tasks.validate.twins import probe, same_outputs

    rows = probe(read_data(prepared.data))
    if not same_outputs(leader, twin, rows):
        get_run_logger().info(
            "validate: %s differs from %s, validated in full", twin.name, leader.name
        )
        return None
    n = len(next(iter(rows.values())))
    get_run_logger().info(
        "validate: %s %s, as %s: the same graph under other thread settings, outputs bitwise "
        "equal on %d samples",
        twin.name,
        "passed" if leader_passed else "FAILED",
        leader.name,
        n,
    )
    return n


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
    data = read_data(prepared.data)
    # Per-token outputs are compared on real tokens only (padding positions zeroed in both).
    outputs = mask_padding(predict(candidate.artifact, candidate.session, data), data)
    ref = mask_padding(ref, data)
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
    candidates: Timed,
    data: DataRef,
    batch_sizes: list[int],
    settings: BenchParams,
    decide: Decision | None = None,
) -> tuple[BenchmarkReport, str]:
    """Time the source (in its own framework when it has one) and every passing candidate.

    The source runs as it is served (``bladeflow.tasks.benchmark.baseline``): a traced graph for
    TensorFlow/Keras, with the eager call timed beside it as ``source-eager``; PyTorch under
    ``inference_mode`` with the candidates' intra-op thread count. The returned text states it.

    With ``decide``, rounds are added (up to ``settings.extra_seconds``) while the decision it
    describes is not yet significant either way.
    """
    runner = open_source_runner(source, options, model)
    models = dict(candidates)
    arrays = read_data(data)
    plan = None
    if runner is not None:
        threads = candidate_threads((c for _, c in candidates.values()), physical_cores())
        plan = plan_source(runner, arrays, threads)
        if plan.note:
            get_run_logger().warning("benchmark: %s", plan.note)
    else:
        models = {SOURCE: (model, SessionConfig()), **models}
    with torch_threads_kept():
        report = benchmark(
            models,
            arrays,
            batch_sizes,
            BenchmarkSettings(**settings.model_dump()),
            progress=get_run_logger().info,
            runners=plan.runners if plan else None,
            more=decide.more_rounds() if decide else None,
        )
    if plan is None:
        return report, "onnxruntime (default session)"
    report = settle(report, plan)
    source_runtime = report.baseline.text() if report.baseline else plan.source
    get_run_logger().info("benchmark: baseline is %s", source_runtime)
    return report, source_runtime


@task(name="benchmark-on-pool")
def remote_benchmark_task(
    settings: Settings,
    run_id: str,
    params: OptimizeParams,
    model: ModelArtifact,
    candidates: Timed,
    data: DataRef,
    batch_sizes: list[int],
    workdir: Path,
) -> tuple[BenchmarkReport, str]:
    """Upload models + data to the MLflow run, benchmark them on the pool's worker, read back."""
    from bladeflow.flows.benchmark import REMOTE_DIR, BenchmarkRequest, RemoteModel, run_remote

    pool = params.benchmark_work_pool
    if pool is None:
        raise UserInputError("benchmark-on-pool needs benchmark_work_pool")
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
    get_run_logger().info("benchmark: %d models sent to work pool %r", len(models), pool)
    report, where = run_remote(request, pool, params.benchmark_timeout_s)
    with reg.mlflow_errors(settings, "tagging the run with the benchmark's hardware"):
        c = reg.client(settings)
        c.set_tag(run_id, registry.RUN_TAG_BENCHMARK_POOL, pool)
        c.set_tag(run_id, registry.RUN_TAG_BENCHMARK_HARDWARE, json.dumps(where, sort_keys=True))
    return report, f"onnxruntime (default session) on work pool {pool!r}: {where.get('cpu')}"


@task(name="download-incumbent", retries=2, retry_delay_seconds=[2, 5])
def incumbent_task(
    settings: Settings, name: str, version: str, folder: Path
) -> tuple[ModelArtifact, SessionConfig]:
    return download_version(settings, name, version, folder)


@task(name="start-mlflow-run", retries=2, retry_delay_seconds=[2, 5])
def start_run_task(settings: Settings, name: str, params: dict[str, object]) -> str:
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
