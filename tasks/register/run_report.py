"""What an optimize run records: metrics, the candidate runs, the report files and version tags.

The flow decides; this module writes the decision down -- in the MLflow run (metrics, one nested
run per candidate, ``reports/``), in files beside it, and in the tags of the version it registers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bladeflow.core import registry
from bladeflow.core.contract import (
    AccuracyReport,
    BenchmarkReport,
    Candidate,
    DataRef,
    ModelArtifact,
    OptimizeResult,
    StageResult,
)
from bladeflow.core.environment import hardware, tool_versions
from bladeflow.core.outcome import Status
from bladeflow.core.params import OptimizeParams
from bladeflow.core.policy import TolerancePolicy
from bladeflow.core.redact import redact
from bladeflow.core.settings import Settings
from bladeflow.tasks.register import mlflow_registry as reg
from bladeflow.tasks.validate.gate import StepError, candidate_steps, validate_chain
from bladeflow.tasks.validate.gx import SuiteResult
from bladeflow.tasks.validate.prepare import PreparedData, read_data
from bladeflow.tasks.validate.report import RunResults, write_report
from bladeflow.tasks.validate.summary import pareto_plot

SOURCE = "source"  # the source model's label in the benchmark and the reports
SOURCE_EAGER = "source-eager"  # the source's eager path, where it is timed beside the served one
_ACCURACY_KEYS = ("max_abs_error", "max_rel_error", "min_cosine", "mean_cosine")


def accuracy_metrics(accuracy: dict[str, AccuracyReport]) -> dict[str, float]:
    """``accuracy.<candidate>.passed`` and ``accuracy.<candidate>.<output>.<metric>``."""
    metrics: dict[str, float] = {}
    for cand, rep in accuracy.items():
        metrics[f"accuracy.{cand}.passed"] = float(rep.passed)
        for out, acc in rep.outputs.items():
            for key in _ACCURACY_KEYS:
                metrics[f"accuracy.{cand}.{out}.{key}"] = getattr(acc, key)
    return metrics


def latency_metrics(bench: BenchmarkReport, result: OptimizeResult) -> dict[str, float]:
    """``latency.<model>.b<batch>.<stat>`` for every timed model and ``speedup.b<batch>``."""
    metrics: dict[str, float] = {}
    for label, per in bench.models.items():
        for bs, s in per.items():
            for key in ("p50_ms", "p90_ms", "p99_ms", "throughput"):
                metrics[f"latency.{label}.b{bs}.{key}"] = getattr(s, key)
    for bs, ratio in result.speedup.items():
        metrics[f"speedup.b{bs}"] = ratio
    return metrics


def log_candidates(
    settings: Settings,
    run_id: str,
    recipes: dict[str, dict[str, Any]],
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport | None,
    chosen: str | None,
    objective_batch: int,
    reports_dir: Path,
) -> None:
    """One nested MLflow run per candidate (its verdict and reason) and the Pareto plot."""
    for name, acc in accuracy.items():
        metrics = {
            f"accuracy.{out}.{k}": getattr(a, k)
            for out, a in acc.outputs.items()
            for k in _ACCURACY_KEYS
        }
        for bs, s in (bench.models.get(name, {}) if bench else {}).items():
            metrics.update(
                {
                    f"latency.b{bs}.p50_ms": s.p50_ms,
                    f"latency.b{bs}.p99_ms": s.p99_ms,
                    f"throughput.b{bs}": s.throughput,
                }
            )
        if name == chosen:
            decision = "chosen"
        elif acc.status is Status.SKIPPED:
            decision = "skipped"
        else:
            decision = "passed" if acc.passed else "rejected"
        tags = {registry.RUN_TAG_GATE: decision, registry.RUN_TAG_REASON: acc.reason[:5000]}
        reg.log_candidate_run(settings, run_id, name, recipes.get(name, {}), metrics, tags)
    pareto_plot(accuracy, bench, chosen, objective_batch, reports_dir / "pareto.png")


def optimize_result(
    params: OptimizeParams,
    run_id: str,
    chosen: Candidate,
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport,
    data: DataRef,
    stages: list[StageResult],
    source_runtime: str,
) -> OptimizeResult:
    """The result ``bladeflow optimize --json`` prints (version filled in at registration)."""
    src, opt = bench.models[SOURCE], bench.models[chosen.name]
    ci = bench.speedup_ci(chosen.name, SOURCE)
    eager = bench.models.get(SOURCE_EAGER, {})
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
        speedup=_speedups(src, opt, ci),
        speedup_ci=ci,
        source_runtime=source_runtime,
        synthetic_data=data.synthetic,
        stages=stages,
        baseline=bench.baseline.text() if bench.baseline else source_runtime,
        source_eager_ms=eager,
        speedup_vs_eager=_speedups(eager, opt, bench.speedup_ci(chosen.name, SOURCE_EAGER))
        if eager
        else {},
    )


def _speedups(
    src: dict[int, Any], opt: dict[int, Any], ci: dict[int, tuple[float, float]]
) -> dict[int, float]:
    """Per batch size: the paired estimate over the benchmark rounds (the centre of its
    log-symmetric interval, so the printed ratio always lies inside ``[lo-hi]``); pooled p50 over
    pooled p50 where rounds were not recorded."""
    out = {}
    for b in opt:
        if b in ci:
            out[b] = round(math.sqrt(ci[b][0] * ci[b][1]), 4)
        else:
            out[b] = src[b].p50_ms / opt[b].p50_ms if opt[b].p50_ms else 0.0
    return out


def version_tags(
    params: OptimizeParams,
    model: ModelArtifact,
    chosen: Candidate,
    data: DataRef,
    baseline: str = "",
) -> dict[str, str]:
    """The registry schema's version tags (bladeflow.core.registry) for the chosen candidate;
    ``baseline`` is what the speedup was measured against (``OptimizeResult.baseline``)."""
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
        registry.TAG_BASELINE: baseline[:5000],
    }


def write_summary_files(
    folder: Path,
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport | None,
    candidates_md: str,
    summary: str | None,
    stages: list[StageResult],
) -> None:
    """``reports/``: accuracy.json, benchmark.json, candidates.md, summary.md, stages.json."""
    doc = {k: v.model_dump(mode="json") for k, v in accuracy.items()}
    (folder / "accuracy.json").write_text(json.dumps(doc, indent=2))
    if bench is not None:
        (folder / "benchmark.json").write_text(bench.model_dump_json(indent=2))
    (folder / "candidates.md").write_text(candidates_md)
    if summary is not None:
        (folder / "summary.md").write_text(summary)
    (folder / "stages.json").write_text(
        json.dumps([s.model_dump(mode="json") for s in stages], indent=2)
    )


def full_report(
    params: OptimizeParams,
    reports_dir: Path,
    accuracy: dict[str, Any],
    chosen: Candidate | None,
    bench: BenchmarkReport | None,
    prepared: PreparedData,
    chain: list[StepError],
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


def pass_chain(
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


def gate_failure_message(accuracy: dict[str, AccuracyReport]) -> str:
    """Why nothing was registered, naming every candidate's reason, and what the user can do."""
    return (
        "no candidate passed the accuracy gate ("
        + "; ".join(f"{n}: {a.reason}" for n, a in accuracy.items())
        + "). Nothing was registered. "
        "Loosen the tolerance (--atol/--rtol/--min-cosine) only if these errors are "
        "acceptable for your task."
    )
