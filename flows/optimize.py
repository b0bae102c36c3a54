"""The optimize flow: convert -> optimize -> validate -> benchmark -> register (-> tune-serving).

This module wires the stages; their work lives in ``tasks/<stage>/``, the Prefect task wrappers in
``flows/stages.py`` and the candidate tournament in ``flows/candidates.py``. A candidate whose
pass, validation or benchmark raises is FAILED with its reason and the others go on; only a
baseline that cannot run ends the run. With ``tune_serving``, the registered version's serving is
tuned last (``flows/tune.py``); a failed tune is reported, never unregisters it.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bladeflow.core import registry
from bladeflow.core.contract import AccuracyReport, BenchmarkReport, OptimizeResult, StageResult
from bladeflow.core.errors import AccuracyGateError
from bladeflow.core.outcome import Outcome, Status
from bladeflow.core.params import Objective, OptimizeParams
from bladeflow.core.settings import Settings
from bladeflow.flows import stages as s
from bladeflow.flows.budget import accuracy_budget_task
from bladeflow.flows.candidates import (
    benchmark_all,
    build_all,
    not_run,
    recipe_params,
    run_params,
    stage,
    validate_all,
)
from bladeflow.flows.tune import tune_registered
from bladeflow.tasks.benchmark.incumbent import INCUMBENT, resolve_version
from bladeflow.tasks.benchmark.select import judge_incumbent, select_candidate
from bladeflow.tasks.optimize.base import PassContext
from bladeflow.tasks.optimize.int8_static import graph_op_types
from bladeflow.tasks.optimize.recipes import plan_recipes
from bladeflow.tasks.register import mlflow_registry as reg
from bladeflow.tasks.register import run_report as rr
from bladeflow.tasks.validate.prepare import read_data
from bladeflow.tasks.validate.report import version_description
from bladeflow.tasks.validate.summary import candidate_rows, candidates_markdown, summary_markdown


@flow(name="optimize")
def optimize_flow(params: OptimizeParams) -> OptimizeResult:
    """Convert, optimize, validate, benchmark and register one model.

    Raises:
        UserInputError: the source, data or options cannot be used (nothing is registered).
        AccuracyGateError: no candidate passed the accuracy gate (nothing gets an alias).
    """
    from bladeflow.tasks.convert.dispatch import detect
    from bladeflow.tasks.convert.seq2seq_source import FORMAT as SEQ2SEQ

    if detect(params.source, params.format) == SEQ2SEQ:  # encoder-decoders: a decoder loop
        from bladeflow.flows.generation import generation_flow

        generated = generation_flow(params)
        return tune_registered(params, generated) if params.tune_serving else generated
    settings = Settings.from_env().with_tracking_uri(params.tracking_uri)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = settings.workdir / f"{params.name}-{stamp}"
    reports = run_dir / "reports"
    (reports / "gx").mkdir(parents=True, exist_ok=True)
    stages: list[StageResult] = []
    objective = Objective.parse(params.objective)
    batch_sizes = sorted({*params.batch_sizes, objective.batch})
    # Checked before any work: a wrong must_beat is a usage error, not a late surprise.
    incumbent = (
        resolve_version(settings, params.name, params.must_beat) if params.must_beat else None
    )

    options = s.convert_options(params)
    with stage(stages, "convert"):
        model = s.convert_task(params.source, options, run_dir / "converted")
    with stage(stages, "prepare-data"):
        prepared = s.prepare_data_task(model, params, run_dir)
    for check in prepared.checks:  # the data checks' GX results go to MLflow with the report
        shutil.copy(check, reports / "gx" / Path(check).name)
    policy = params.effective_policy()
    plan = plan_recipes(
        params.preset, params.passes, op_types=graph_op_types(model.path), model=model
    )
    run_id = s.start_run_task(
        settings, params.name, run_params(params, policy, plan, model, prepared)
    )
    try:
        with stage(stages, "optimize") as st:
            # The reference comes first: accuracy recovery searches against it while it builds.
            reference = s.reference_task(params.source, options, model, prepared.data, run_dir)
            policy = accuracy_budget_task(
                settings, run_id, params, model, reference, prepared.data.synthetic
            )
            context = PassContext(
                data=prepared.data,
                reference_path=reference,
                tolerance=params.tolerance,
                policy=policy,
                time_budget_s=params.recovery_budget_s,
            )
            candidates, failed = build_all(plan.recipes, model, run_dir / "candidates", context)
            st.outputs = {"candidates": [c.name for c in candidates], "failed": failed}

        with stage(stages, "validate") as st:
            outcomes, accuracy = validate_all(candidates, reference, prepared, policy, reports)
            for name, why in failed.items():
                accuracy[name] = not_run(name, Status.FAILED, f"pass failed: {why}", prepared.data)
            for name, why in plan.skipped.items():
                accuracy[name] = not_run(name, Status.SKIPPED, why, prepared.data)
            passing = [c for c in candidates if accuracy[c.name].passed]
            st.outputs = {"passed": [c.name for c in passing]}
            st.metrics = {f"{n}.passed": float(a.passed) for n, a in accuracy.items()}
        reg.log_metrics(settings, run_id, rr.accuracy_metrics(accuracy))
        if not passing:
            rr.log_candidates(
                settings,
                run_id,
                recipe_params(plan),
                accuracy,
                None,
                None,
                objective.batch,
                reports,
            )
            _candidate_table(accuracy, None, None, objective.batch)
            md = candidates_markdown(accuracy, None, None, objective.batch)
            rr.write_summary_files(reports, accuracy, None, md, None, stages)
            rr.full_report(params, reports, {**accuracy, **outcomes}, None, None, prepared, [])
            reg.log_artifacts(settings, run_id, reports, "reports")
            reasons = {n: a.reason for n, a in accuracy.items()}
            raise AccuracyGateError(rr.gate_failure_message(accuracy), reasons, run_id)

        with stage(stages, "benchmark") as st:
            timed = {c.name: (c.artifact, c.session) for c in passing}
            if incumbent is not None:  # timed in the same rounds: the only fair comparison
                timed[INCUMBENT] = s.incumbent_task(
                    settings, params.name, incumbent, run_dir / INCUMBENT
                )
            decide = s.Decision(
                passing=passing,
                objective=objective,
                incumbent=INCUMBENT if incumbent else None,
                min_speedup=params.min_speedup,
                planned_rounds=params.bench.rounds if incumbent else None,
            )
            screened: dict[str, str] = {}
            bench, source_runtime, dropped = benchmark_all(
                settings,
                run_id,
                params,
                model,
                timed,
                prepared.data,
                batch_sizes,
                run_dir,
                decide,
                screened,
            )
            for name, why in dropped.items():
                accuracy[name] = accuracy[name].model_copy(
                    update={"passed": False, "status": Status.FAILED, "reason": why}
                )
            for name, why in screened.items():  # passed the gate; dominated in a short run
                accuracy[name] = accuracy[name].model_copy(update={"reason": why})
            passing = [c for c in passing if c.name not in dropped and c.name not in screened]
            chosen = select_candidate(passing, bench, objective)
            st.outputs = {"chosen": chosen.name, "failed": dropped}

        rr.log_candidates(
            settings,
            run_id,
            recipe_params(plan),
            accuracy,
            bench,
            chosen.name,
            objective.batch,
            reports,
        )
        _candidate_table(accuracy, bench, chosen.name, objective.batch)
        result = rr.optimize_result(
            params, run_id, chosen, accuracy, bench, prepared.data, stages, source_runtime
        )
        candidates_md = candidates_markdown(accuracy, bench, chosen.name, objective.batch)
        summary = summary_markdown(result, candidates_md, params.source)
        rr.write_summary_files(reports, accuracy, bench, candidates_md, summary, stages)
        chain = rr.pass_chain(model, chosen, run_dir, prepared, policy, reference)
        report_md = rr.full_report(
            params, reports, {**accuracy, **outcomes}, chosen, bench, prepared, chain
        )
        reg.log_metrics(settings, run_id, rr.latency_metrics(bench, result))
        reg.log_artifacts(settings, run_id, reports, "reports")
        if incumbent is not None:
            verdict = judge_incumbent(  # rounds were added until decided: sequential interval
                bench,
                chosen.name,
                INCUMBENT,
                incumbent,
                objective,
                params.min_speedup,
                planned_rounds=params.bench.rounds,
            )
            lo, hi = verdict.ci
            reg.log_metrics(
                settings,
                run_id,
                {"speedup_vs_incumbent": verdict.speedup, "speedup_vs_incumbent_lo": lo}
                | ({"speedup_vs_incumbent_hi": hi} if hi != float("inf") else {}),
            )
            result = result.model_copy(
                update={
                    "incumbent_version": incumbent,
                    "incumbent_speedup": round(verdict.speedup, 3),
                    "incumbent_speedup_ci": verdict.ci,
                }
            )
            if not verdict.improved:
                get_run_logger().info("register: skipped, %s", verdict.reason)
                stages.append(
                    StageResult(
                        stage="register",
                        status=Status.SKIPPED,
                        elapsed_s=0.0,
                        reason=verdict.reason,
                    )
                )
                _end(settings, run_id, Outcome.NOT_IMPROVED, verdict.reason)
                return result.model_copy(
                    update={"outcome": Outcome.NOT_IMPROVED.value, "version": "", "model_uri": ""}
                )

        with stage(stages, "register"):
            # Passes rewrite the graph, not the tokenizer: ship the converted model's assets.
            artifact = chosen.artifact.model_copy(update={"assets": model.assets})
            chosen = chosen.model_copy(update={"artifact": artifact})
            tags = rr.version_tags(params, model, chosen, prepared.data, result.baseline)
            example = {k: v[:1] for k, v in read_data(prepared.data).items()}
            description = version_description(report_md)
            version, uri = s.register_task(
                settings, run_id, params.name, chosen, tags, description, example
            )
        result = result.model_copy(update={"version": version, "model_uri": uri, "stages": stages})
        create_markdown_artifact(
            report_md + "\n\n## Candidates\n\n" + candidates_md,
            key="optimize-report",
            description=f"{params.name} v{version}",
        )
        _end(settings, run_id, Outcome.REGISTERED, "", version=version)
    except AccuracyGateError as exc:
        _end(settings, run_id, Outcome.ACCURACY_GATE_FAILED, str(exc))
        raise
    except BaseException as exc:
        _end(settings, run_id, Outcome.ERROR, str(exc))
        raise
    # After the run ended as registered: whatever the tune does, the version stays.
    return tune_registered(params, result) if params.tune_serving else result


def _end(settings: Settings, run_id: str, outcome: Outcome, reason: str, version: str = "") -> None:
    """Close the MLflow run with its outcome tag (quietly when the run already failed)."""
    ok = outcome in (Outcome.REGISTERED, Outcome.NOT_IMPROVED)
    tags = {registry.RUN_TAG_OUTCOME: outcome.value}
    if reason:
        tags[registry.RUN_TAG_REASON] = reason[:5000]
    if version:
        tags[registry.RUN_TAG_VERSION] = version
    reg.end_run(settings, run_id, "FINISHED" if ok else "FAILED", tags, quiet=not ok)


def _candidate_table(
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport | None,
    chosen: str | None,
    batch: int,
) -> None:
    create_table_artifact(
        candidate_rows(accuracy, bench, chosen, batch),
        key="optimize-candidates",
        description="Every candidate, its accuracy-gate verdict, latency and why it was chosen "
        "or rejected.",
    )
