"""The optimize flow of generation models (encoder-decoders): convert -> candidates -> generation
gate -> generate benchmark -> register the folder.

``flows/optimize.py`` hands a ``seq2seq`` source here. The reference is ``source.generate()`` in
PyTorch with the model's generation config on the user's data; candidates are bladeflow's ONNX
Runtime decoder loop over the exported graphs (fp32, and int8 on the decoder) and, for text
models, ONNX Runtime's BeamSearch op over the same graphs; the registered
version's ``latency_ms``/``speedup`` are generate latencies at a fixed number of new tokens.
With reference texts in the data, the gate also scores the decoded text (WER/CER for speech,
chrF for text); the benchmark adds the encoder / first step / per-token breakdown
(``reports/breakdown.json``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bladeflow.core.contract import (
    AccuracyReport,
    BenchmarkReport,
    Candidate,
    DataRef,
    ModelArtifact,
    OptimizeResult,
    StageResult,
)
from bladeflow.core.errors import AccuracyGateError
from bladeflow.core.outcome import Outcome, Status
from bladeflow.core.params import Objective, OptimizeParams
from bladeflow.core.settings import Settings
from bladeflow.flows import stages as s
from bladeflow.flows.candidates import stage
from bladeflow.tasks.benchmark import generation as gb
from bladeflow.tasks.benchmark.select import select_candidate
from bladeflow.tasks.convert.seq2seq_source import TOKENIZER_DIR
from bladeflow.tasks.optimize import seq2seq as cands
from bladeflow.tasks.register import mlflow_registry as reg
from bladeflow.tasks.register import run_report as rr
from bladeflow.tasks.validate import generation as gv

Batches = list[dict[str, np.ndarray]]


@task(name="generation-data", cache_policy=NO_CACHE, persist_result=False)
def data_task(model: ModelArtifact, params: OptimizeParams) -> tuple[Batches, list[str] | None]:
    """The encoder inputs in batches and, when the data has them, the reference texts."""
    kind = _kind(model)
    column = params.text_columns[0] if params.text_columns else None
    shape = None
    if kind == "speech":
        mel, frames = model.signature.inputs[0].shape[1:]
        shape = (mel, frames) if isinstance(mel, int) and isinstance(frames, int) else None
    batches = gv.load_inputs(
        params.data, kind, model.assets[TOKENIZER_DIR], column, feature_shape=shape
    )
    refs = gv.load_references(params.data, kind, params.labels_column)
    get_run_logger().info(
        "data: %d samples from %s%s",
        sum(len(b[next(iter(b))]) for b in batches),
        params.data,
        f", {len(refs)} reference texts" if refs else "",
    )
    return batches, refs


def _kind(model: ModelArtifact) -> str:
    return str(model.provenance.step.config["kind"]) if model.provenance.step else "text"


@task(name="reference-generate", cache_policy=NO_CACHE, persist_result=False)
def reference_task(
    source: str, batches: Batches, search: gv.GenerationSettings
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The source's generate() tokens and teacher-forced logits (PyTorch eager)."""
    from bladeflow.tasks.convert.seq2seq_export import load_seq2seq, source_outputs

    model, _ = load_seq2seq(source)
    get_run_logger().info("reference: source.generate() in PyTorch with %s", search.kwargs())
    return source_outputs(model, batches, **search.kwargs())


@task(name="build-candidates", cache_policy=NO_CACHE)
def build_task(model: ModelArtifact, workdir: Path) -> tuple[list[Candidate], dict[str, str]]:
    return cands.build_candidates(model, workdir)


@task(name="generation-gate", task_run_name="gate-{candidate.name}", cache_policy=NO_CACHE)
def gate_task(
    candidate: Candidate,
    batches: Batches,
    reference: tuple[list[np.ndarray], list[np.ndarray]],
    search: gv.GenerationSettings,
    eos: int,
    labels: Labels | None = None,
    policy: gv.GenerationPolicy | None = None,
) -> tuple[AccuracyReport, gv.GenerationAccuracy]:
    from bladeflow.core.search_op import SEARCH_FILE, generate_batches

    ref_tokens, ref_logits = reference
    folder = Path(candidate.artifact.path).parent
    tokens, logits = gv.run_candidate(folder, candidate.session, batches, ref_tokens, search)
    if (folder / SEARCH_FILE).is_file():  # the op's own tokens; logits: the same two graphs
        tokens = generate_batches(folder, candidate.session, batches, search.kwargs())
    acc = gv.compare(tokens, ref_tokens, logits, ref_logits, eos)
    if labels is not None:
        task = gv.score_texts(labels.kind, labels.tokenizer_dir, tokens, labels.texts, eos)
        acc = acc.model_copy(update={"task": task, "source_task": labels.source})
    report = gv.judge(candidate.name, acc, candidate.name in cands.REDUCED, policy)
    get_run_logger().info("validate: %s %s: %s", candidate.name, report.status, report.reason)
    return report, acc


@task(name="generate-benchmark", cache_policy=NO_CACHE, persist_result=False)
def bench_task(
    source: str,
    passing: list[Candidate],
    batches: Batches,
    batch_sizes: list[int],
    settings: gb.GenerateBench,
) -> tuple[BenchmarkReport, gb.GenerationBreakdown]:
    """Generate latency of the source and the passing candidates, then where it goes (encoder,
    first step, per token against the bandwidth bound)."""
    from bladeflow.tasks.convert.seq2seq_export import load_seq2seq

    log = get_run_logger().info
    model, _ = load_seq2seq(source)
    runs: dict[str, gb.Run] = {rr.SOURCE: gb.torch_runner(model, settings)}
    for c in passing:
        runs[c.name] = gb.onnx_runner(Path(c.artifact.path).parent, c.session, settings)
    bench = gb.bench_generate(runs, batches, batch_sizes, settings, log)
    folders = {c.name: (Path(c.artifact.path).parent, c.session) for c in passing}
    parts = gb.breakdown(model, folders, batches, batch_sizes, settings, log)
    return bench, parts


@dataclass(frozen=True)
class Labels:
    """Reference texts of the validation data and the source's task metrics on them."""

    kind: str
    tokenizer_dir: str
    texts: list[str]
    source: dict[str, float]


@flow(name="optimize-generation")
def generation_flow(params: OptimizeParams) -> OptimizeResult:
    """Optimize, validate, benchmark and register one encoder-decoder.

    Raises:
        UserInputError: the source or data cannot be used (nothing is registered).
        AccuracyGateError: no candidate reproduced the source's generation.
    """
    gv.check_data(params.data)  # before the (slow) conversion
    settings = Settings.from_env().with_tracking_uri(params.tracking_uri)
    run_dir = (
        settings.workdir / f"{params.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    reports = run_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    stages: list[StageResult] = []
    objective = Objective.parse(params.objective)
    batch_sizes = sorted({*params.batch_sizes, objective.batch})

    with stage(stages, "convert"):
        model = s.convert_task(params.source, s.convert_options(params), run_dir / "converted")
    step = model.provenance.step.config if model.provenance.step else {}
    search = gv.GenerationSettings(**step.get("generation", {}))
    eos = int(json.loads(Path(model.path).read_text())["eos_token_id"])
    with stage(stages, "prepare-data"):
        batches, ref_texts = data_task(model, params)
    policy = _policy(params, ref_texts)
    data = DataRef(
        path=str(params.data),
        samples=sum(len(next(iter(b.values()))) for b in batches),
        synthetic=False,
    )
    run_id = s.start_run_task(settings, params.name, _run_params(params, search))
    try:
        with stage(stages, "optimize") as st:
            reference = reference_task(params.source, batches, search)
            candidates, failed = build_task(model, run_dir / "candidates")
            st.outputs = {"candidates": [c.name for c in candidates], "failed": failed}
        with stage(stages, "validate") as st:
            labels = None
            if ref_texts is not None:
                tok_dir, kind = model.assets[TOKENIZER_DIR], _kind(model)
                source_scores = gv.score_texts(kind, tok_dir, reference[0], ref_texts, eos)
                labels = Labels(kind, tok_dir, ref_texts, source_scores)
                st.outputs = {"source_task_metrics": source_scores}
            accuracy: dict[str, AccuracyReport] = {}
            metrics: dict[str, float] = {}
            for c in candidates:
                accuracy[c.name], acc = gate_task(
                    c, batches, reference, search, eos, labels, policy
                )
                metrics |= {f"generation.{c.name}.{k}": v for k, v in acc.metrics().items()}
            for name, why in failed.items():
                accuracy[name] = _not_run(name, why)
            passing = [c for c in candidates if accuracy[c.name].passed]
            st.outputs = {**(st.outputs or {}), "passed": [c.name for c in passing]}
        reg.log_metrics(settings, run_id, rr.accuracy_metrics(accuracy) | metrics)
        (reports / "accuracy.json").write_text(
            json.dumps({k: v.model_dump(mode="json") for k, v in accuracy.items()}, indent=2)
        )
        if not passing:
            reg.log_artifacts(settings, run_id, reports, "reports")
            reasons = {n: a.reason for n, a in accuracy.items()}
            raise AccuracyGateError(
                "no generation candidate reproduced the source: "
                + "; ".join(f"{n}: {r}" for n, r in reasons.items()),
                reasons,
                run_id,
            )
        with stage(stages, "benchmark") as st:
            bench_settings = gb.GenerateBench(
                new_tokens=search.max_new_tokens,
                num_beams=search.num_beams,
                length_penalty=search.length_penalty,
                rounds=max(2, params.bench.rounds),
                iterations=max(1, min(params.bench.iterations, 5)),
                warmup=min(params.bench.warmup, 1),
            )
            bench, parts = bench_task(params.source, passing, batches, batch_sizes, bench_settings)
            chosen = select_candidate(passing, bench, objective)
            st.outputs = {"chosen": chosen.name, "new_tokens": bench_settings.new_tokens}
        (reports / "benchmark.json").write_text(bench.model_dump_json(indent=2))
        (reports / "breakdown.json").write_text(parts.model_dump_json(indent=2))
        reg.log_metrics(settings, run_id, parts.metrics())
        runtime = f"pytorch eager generate(use_cache=True), {bench_settings.new_tokens} new tokens"
        result = rr.optimize_result(params, run_id, chosen, accuracy, bench, data, stages, runtime)
        reg.log_metrics(settings, run_id, rr.latency_metrics(bench, result))
        summary = _summary(params, chosen, accuracy, bench, bench_settings, objective.batch)
        summary += "\n## Where generate() time goes\n\n" + gb.breakdown_table(parts)
        (reports / "summary.md").write_text(summary)
        reg.log_artifacts(settings, run_id, reports, "reports")
        with stage(stages, "register"):
            tags = rr.version_tags(params, model, chosen, data)
            version, uri = s.register_task(
                settings, run_id, params.name, chosen, tags, summary, None
            )
        _end(settings, run_id, Outcome.REGISTERED, "", version)
        return result.model_copy(update={"version": version, "model_uri": uri, "stages": stages})
    except AccuracyGateError as exc:
        _end(settings, run_id, Outcome.ACCURACY_GATE_FAILED, str(exc))
        raise
    except BaseException as exc:
        _end(settings, run_id, Outcome.ERROR, str(exc))
        raise


def _policy(params: OptimizeParams, labels: list[str] | None) -> gv.GenerationPolicy:
    """The gate's policy; ``--accuracy metric_drop<=D`` bounds the task metric's drop (labels
    needed: without them the limit could not be checked, so it is refused)."""
    from bladeflow.core.errors import DataError

    budget = params.accuracy_budget()
    drops = [lim.value for lim in budget.limits if lim.measure == "metric_drop"] if budget else []
    if not drops:
        return gv.GenerationPolicy()
    if labels is None:
        raise DataError(
            "metric_drop needs reference texts: a 'labels' string array in the .npz (speech) or "
            "--labels-column (text)"
        )
    return gv.GenerationPolicy(max_metric_drop=min(d for d in drops if d is not None))


def _not_run(name: str, why: str) -> AccuracyReport:
    return AccuracyReport(
        candidate=name,
        passed=False,
        outputs={},
        reason=f"pass failed: {why}",
        synthetic_data=False,
        status=Status.FAILED,
    )


def _run_params(params: OptimizeParams, search: gv.GenerationSettings) -> dict[str, Any]:
    return {
        "source": params.source,
        "data": params.data,
        "format": "seq2seq",
        "generation": search.kwargs(),
        "batch_sizes": params.batch_sizes,
        "objective": params.objective,
    }


def _summary(
    params: OptimizeParams,
    chosen: Candidate,
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport,
    bench_settings: gb.GenerateBench,
    batch: int,
) -> str:
    lines = [
        f"# {params.name}: generation model from {params.source}",
        "",
        f"Chosen: **{chosen.name}**. Latency is generate() of {bench_settings.new_tokens} new "
        f"tokens (min = max, {bench_settings.num_beams} beam(s)) against PyTorch eager "
        "generate(use_cache=True), same threads.",
        "",
        f"| candidate | gate | p50 ms @{batch} | speedup | accuracy |",
        "|---|---|---|---|---|",
    ]
    src = bench.models[rr.SOURCE].get(batch)
    for name, rep in accuracy.items():
        stats = bench.models.get(name, {}).get(batch)
        p50 = f"{stats.p50_ms:.1f}" if stats else "-"
        speed = f"{src.p50_ms / stats.p50_ms:.2f}x" if stats and src else "-"
        lines.append(f"| {name} | {rep.status} | {p50} | {speed} | {rep.reason} |")
    if src:
        lines.append(f"| source (PyTorch) | - | {src.p50_ms:.1f} | 1.00x | - |")
    return "\n".join(lines) + "\n"


def _end(settings: Settings, run_id: str, outcome: Outcome, reason: str, version: str = "") -> None:
    from bladeflow.core import registry

    ok = outcome is Outcome.REGISTERED
    tags = {registry.RUN_TAG_OUTCOME: outcome.value}
    if reason:
        tags[registry.RUN_TAG_REASON] = reason[:5000]
    if version:
        tags[registry.RUN_TAG_VERSION] = version
    reg.end_run(settings, run_id, "FINISHED" if ok else "FAILED", tags, quiet=not ok)
