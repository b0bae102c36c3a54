"""The candidate tournament inside the optimize flow: build, validate and time each candidate so
that one candidate's exception rejects that candidate only.

Every failure becomes the candidate's FAILED status with a one-line reason (the full traceback
stays in the task's log); only the baseline -- the unoptimized model -- ends the run when it
cannot be built, validated or timed, because without it nothing can be judged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from bladeflow.core.contract import (
    AccuracyReport,
    BenchmarkReport,
    Candidate,
    DataRef,
    ModelArtifact,
    StageResult,
)
from bladeflow.core.environment import hardware
from bladeflow.core.errors import BladeflowError
from bladeflow.core.faults import fault_point
from bladeflow.core.outcome import Status
from bladeflow.core.params import OptimizeParams
from bladeflow.core.policy import TolerancePolicy
from bladeflow.core.settings import Settings
from bladeflow.flows import stages as s
from bladeflow.tasks.benchmark.probe import one_line, probe
from bladeflow.tasks.benchmark.select import (
    not_eligible_reason,
    screen,
    select_candidate,
    simplicity,
)
from bladeflow.tasks.optimize.base import PassContext
from bladeflow.tasks.optimize.recipes import BASELINE, Recipe, RecipePlan
from bladeflow.tasks.validate.gate import GateOutcome
from bladeflow.tasks.validate.prepare import PreparedData, read_data
from bladeflow.tasks.validate.twins import twin_key


class BaselineError(BladeflowError):
    """The unoptimized model itself cannot run: nothing can be judged. Exit code 2."""

    exit_code = 2


@contextmanager
def stage(stages: list[StageResult], name: str) -> Iterator[StageResult]:
    """Record one stage's status, reason and time in ``stages``."""
    fault_point(name)  # no-op unless a reliability test asks to pause here (bladeflow/faults.py)
    result = StageResult(stage=name, status=Status.OK, elapsed_s=0.0)
    started = time.perf_counter()
    try:
        yield result
    except BaseException as exc:
        result.status = Status.FAILED
        result.reason = str(exc)
        raise
    finally:
        result.elapsed_s = round(time.perf_counter() - started, 3)
        stages.append(result)


def _failure(state: Any) -> BaseException:
    exc = state.result(raise_on_failure=False)
    return exc if isinstance(exc, BaseException) else RuntimeError(str(exc))


def build_all(
    recipes: list[Recipe], model: ModelArtifact, workdir: Path, context: PassContext
) -> tuple[list[Candidate], dict[str, str]]:
    """Build every candidate; a pass that raises rejects its candidate (name -> reason)."""
    futures = [(r, s.build_candidate_task.submit(r, model, workdir, context)) for r in recipes]
    built, failed = [], {}
    for recipe, fut in futures:
        state = fut.wait() or fut.state
        if state.is_completed():
            built.append(fut.result())
            continue
        exc = _failure(state)
        if recipe.name == BASELINE:  # the unoptimized model must always be a candidate
            raise exc
        failed[recipe.name] = one_line(exc)
    return built, failed


def validate_all(
    candidates: list[Candidate],
    reference: str,
    prepared: PreparedData,
    policy: TolerancePolicy,
    reports: Path,
) -> tuple[dict[str, GateOutcome], dict[str, AccuracyReport]]:
    """The accuracy gate for every candidate; one that cannot even run is FAILED with why.

    A twin (the same graph as an earlier candidate, under thread settings only) inherits that
    candidate's verdict when its outputs on a probe of the data are bitwise the same
    (``bladeflow.tasks.validate.twins``); otherwise it is validated in full.
    """
    leaders: dict[tuple[str, str, tuple[str, ...], str], Candidate] = {}
    twins: list[tuple[Candidate, Candidate]] = []
    for c in candidates:
        leader = leaders.setdefault(twin_key(c), c)
        if leader is not c and c.name != BASELINE:
            twins.append((c, leader))
    twin_names = {c.name for c, _ in twins}
    futures = [
        (c, s.validate_task.submit(c, reference, prepared, policy, reports / "gx"))
        for c in candidates
        if c.name not in twin_names
    ]
    outcomes: dict[str, GateOutcome] = {}
    accuracy: dict[str, AccuracyReport] = {}
    outcomes_of_twins, full = _inherit(twins, outcomes_of(futures), prepared)
    futures += [
        (c, s.validate_task.submit(c, reference, prepared, policy, reports / "gx")) for c in full
    ]
    outcomes.update(outcomes_of_twins)
    accuracy.update({n: o.report for n, o in outcomes_of_twins.items()})
    for cand, fut in futures:
        state = fut.wait() or fut.state
        if state.is_completed():
            outcomes[cand.name] = fut.result()
            accuracy[cand.name] = outcomes[cand.name].report
            continue
        exc = _failure(state)
        if cand.name == BASELINE and not isinstance(exc, BladeflowError):
            raise BaselineError(f"the unoptimized model cannot run on the data: {one_line(exc)}")
        if cand.name == BASELINE:
            raise exc
        accuracy[cand.name] = not_run(
            cand.name, Status.FAILED, f"validation failed: {one_line(exc)}", prepared.data
        )
    return outcomes, accuracy


def outcomes_of(futures: list[tuple[Candidate, Any]]) -> dict[str, GateOutcome]:
    """The outcomes of the validations that completed (waiting for each)."""
    done: dict[str, GateOutcome] = {}
    for cand, fut in futures:
        state = fut.wait() or fut.state
        if state.is_completed():
            done[cand.name] = fut.result()
    return done


def _inherit(
    twins: list[tuple[Candidate, Candidate]],
    leaders: dict[str, GateOutcome],
    prepared: PreparedData,
) -> tuple[dict[str, GateOutcome], list[Candidate]]:
    """(twin -> the leader's outcome under the twin's name, twins to validate in full)."""
    inherited: dict[str, GateOutcome] = {}
    full = [t for t, lead in twins if lead.name not in leaders]  # the leader did not finish
    checks = [
        (t, lead, s.twin_task.submit(t, lead, prepared, leaders[lead.name].report.passed))
        for t, lead in twins
        if lead.name in leaders
    ]
    for twin, leader, fut in checks:
        outcome = leaders[leader.name]
        state = fut.wait() or fut.state
        rows = fut.result() if state.is_completed() else None
        if rows is None:
            full.append(twin)
            continue
        report = outcome.report.model_copy(
            update={
                "candidate": twin.name,
                "reason": outcome.report.reason
                or f"same graph as {leader.name} (outputs bitwise equal on {rows} samples)",
            }
        )
        inherited[twin.name] = replace(outcome, report=report)
    return inherited, full


def not_run(name: str, status: Status, reason: str, data: DataRef) -> AccuracyReport:
    """The gate's record of a candidate that was skipped or failed before it could be judged."""
    return AccuracyReport(
        candidate=name,
        passed=False,
        outputs={},
        reason=reason,
        synthetic_data=data.synthetic,
        status=status,
    )


def benchmark_all(
    settings: Settings,
    run_id: str,
    params: OptimizeParams,
    model: ModelArtifact,
    timed: s.Timed,
    data: DataRef,
    batch_sizes: list[int],
    run_dir: Path,
    decide: s.Decision | None = None,
    screened: dict[str, str] | None = None,
) -> tuple[BenchmarkReport, str, dict[str, str]]:
    """Time the source and the passing candidates; a candidate that breaks the run is dropped.

    In two phases when there is a decision to make and other batch sizes to check: every
    candidate at the objective's batch size (rounds added while the choice is undecided, see
    ``Decision``), then only the chosen one with the baseline at the other batch sizes -- the
    batch-size guard's question ("is the choice significantly slower than the unoptimized model
    anywhere?"). If the guard excludes it, the next choice is timed there too, beside it. The
    other candidates are not timed at the other batch sizes: no choice depends on them, and on a
    transformer the large batches are most of the benchmark's time (the demo: 281 s -> ~100 s).

    With more than ``SCREEN_ABOVE`` candidates, a short screening run first drops those another
    candidate beats significantly (``select.screen``); they are added to ``screened`` (candidate
    -> reason) and not timed in full.
    Returns the report, what ran the source, and candidate -> reason for those dropped.
    """
    if decide is None or params.benchmark_work_pool:
        return _time_all(params, model, timed, data, batch_sizes, run_dir, settings, run_id, None)
    same = identical(decide.passing)
    if same:
        timed = {n: m for n, m in timed.items() if n not in same}
        decide = decide.model_copy(
            update={"passing": [c for c in decide.passing if c.name not in same]}
        )
        if screened is not None:
            screened.update(same)
    objective = decide.objective.batch
    others = [b for b in batch_sizes if b != objective]
    first_sizes = [objective] if objective in batch_sizes and others else batch_sizes
    if len(timed) > SCREEN_ABOVE:
        out = screen_all(params, model, timed, data, first_sizes, decide)
        timed = {n: m for n, m in timed.items() if n not in out}
        if screened is not None:
            screened.update(out)
    report, runtime, failed = _time_all(
        params, model, timed, data, first_sizes, run_dir, settings, run_id, decide
    )
    if first_sizes == batch_sizes:
        return report, runtime, failed
    passing = [c for c in decide.passing if c.name in report.models]
    checked: list[str] = []
    for _ in range(GUARD_TRIES):
        chosen = select_candidate(passing, report, decide.objective).name
        if chosen == BASELINE or chosen in checked:
            break
        checked.append(chosen)
        names = {BASELINE, *checked}
        extra = {n: m for n, m in timed.items() if n in names}
        second, _, broke = _time_all(
            params, model, extra, data, others, run_dir, settings, run_id, None
        )
        failed.update(broke)
        passing = [c for c in passing if c.name not in broke]
        report = _merged(report, second)
        if chosen not in broke and not_eligible_reason(report, chosen, decide.objective) is None:
            break
    if not set(others) <= set(report.models.get(BASELINE, {})):  # the table's reference row
        extra = {n: m for n, m in timed.items() if n == BASELINE}
        second, _, _ = _time_all(
            params, model, extra, data, others, run_dir, settings, run_id, None
        )
        report = _merged(report, second)
    if report.baseline is not None:  # now describes every batch size, not only the first phase's
        runtime = report.baseline.text()
    return report, runtime, failed


def identical(passing: list[Candidate]) -> dict[str, str]:
    """Candidate -> reason for those that are literally another one: the same graph file under
    the same session settings (e.g. SmoothQuant that chose no scaling, then the same int8).

    Timing two identical models can only tell noise apart, and at 95% a difference "found"
    between them flips the choice from run to run (seen on MiniLM: int8-recovered chosen twice,
    then its identical smooth-int8-recovered). The simplest of each group is timed for all.
    """
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in passing:
        groups.setdefault((c.artifact.sha256, c.session.model_dump_json()), []).append(c)
    out: dict[str, str] = {}
    for group in groups.values():
        keep = min(group, key=lambda c: (*simplicity(c), passing.index(c)))
        for c in group:
            if c is not keep and c.name != BASELINE:
                out[c.name] = (
                    f"identical to {keep.name} (the same graph under the same session settings), "
                    "timed once as that one"
                )
    return out


# Seconds of rounds added at the objective while a decision is undecided (unless --bench-extra-s).
INCUMBENT_EXTRA_S = 60.0
CHOICE_EXTRA_S = 30.0
# The batch-size guard may exclude the choice at the objective; the next one is tried, this often.
GUARD_TRIES = 3


def _merged(first: BenchmarkReport, second: BenchmarkReport) -> BenchmarkReport:
    """``first`` (the objective's batch size) with ``second``'s other batch sizes added."""
    models = {n: dict(per) for n, per in first.models.items()}
    for name, per in second.models.items():
        models.setdefault(name, {}).update(per)
    baseline = first.baseline
    if baseline is not None and second.baseline is not None:
        b = second.baseline
        baseline = baseline.model_copy(
            update={
                "eager_faster": sorted({*baseline.eager_faster, *b.eager_faster}),
                "served_p50_ms": {**baseline.served_p50_ms, **b.served_p50_ms},
                "eager_p50_ms": {**baseline.eager_p50_ms, **b.eager_p50_ms},
            }
        )
    return first.model_copy(
        update={
            "models": models,
            "skipped_batch_sizes": {**first.skipped_batch_sizes, **second.skipped_batch_sizes},
            "shapes": first.shapes or second.shapes,
            "baseline": baseline or second.baseline,
        }
    )


def _time_all(
    params: OptimizeParams,
    model: ModelArtifact,
    timed: s.Timed,
    data: DataRef,
    batch_sizes: list[int],
    run_dir: Path,
    settings: Settings,
    run_id: str,
    decide: s.Decision | None,
) -> tuple[BenchmarkReport, str, dict[str, str]]:
    """One interleaved run of ``timed``; a model that breaks it is found alone and dropped."""

    def run(models: s.Timed) -> Any:
        if params.benchmark_work_pool:
            return s.remote_benchmark_task.submit(
                settings, run_id, params, model, models, data, batch_sizes, run_dir
            )
        bench = params.bench
        if decide is not None and not bench.extra_seconds:
            # Registering on noise churns the registry, and a choice made on too few rounds
            # flips from run to run: let a close call earn its verdict.
            extra = INCUMBENT_EXTRA_S if decide.incumbent else CHOICE_EXTRA_S
            bench = bench.model_copy(update={"extra_seconds": extra})
        return s.benchmark_task.submit(
            params.source,
            s.convert_options(params),
            model,
            models,
            data,
            batch_sizes,
            bench,
            decide,
        )

    fut = run(timed)
    state = fut.wait() or fut.state
    if state.is_completed():
        report, runtime = fut.result()
        return report, runtime, {}
    # One model broke the interleaved run: find which ones alone, drop them, time the rest.
    first = _failure(state)
    if isinstance(first, BladeflowError):  # e.g. no worker on the pool: not a candidate's fault
        raise first
    arrays = read_data(data)
    failed = {
        name: why
        for name, (artifact, session) in timed.items()
        if (why := probe(artifact, session, arrays, batch_sizes))
    }
    if BASELINE in failed or not failed:
        why = failed.get(BASELINE) or one_line(first)
        raise BaselineError(
            f"the unoptimized model cannot be timed: {why}. Benchmark only batch sizes it "
            "accepts (--batch-sizes), or check that the model runs on the data you gave."
        )
    get_run_logger().warning("benchmark: dropped %s and timing the rest again", sorted(failed))
    again = run({n: m for n, m in timed.items() if n not in failed})
    state = again.wait() or again.state
    if not state.is_completed():
        raise BaselineError(f"the benchmark failed again: {one_line(_failure(state))}")
    report, runtime = again.result()
    return report, runtime, failed


# More candidates than this get a short screening run (SCREEN_ROUNDS rounds) before the full one.
SCREEN_ABOVE = 4
SCREEN_ROUNDS = 5


def screen_all(
    params: OptimizeParams,
    model: ModelArtifact,
    timed: s.Timed,
    data: DataRef,
    batch_sizes: list[int],
    decide: s.Decision,
) -> dict[str, str]:
    """Candidate -> reason for those a short interleaved run shows are dominated (``screen``).

    The run is a few rounds of a few calls at every batch size: enough to see a candidate that is
    slower everywhere, never enough to choose. A screening run that fails drops nothing (the full
    benchmark then finds which model broke it).
    """
    bench = params.bench
    quick = bench.model_copy(
        update={
            "warmup": min(bench.warmup, 2),
            "rounds": SCREEN_ROUNDS,
            "iterations": max(2, bench.iterations // 5),
            "max_seconds": min(bench.max_seconds, 2.0),
            "extra_seconds": 0.0,
        }
    )
    names = {c.name for c in decide.passing}
    fut = s.benchmark_task.submit(
        params.source,
        s.convert_options(params),
        model,
        {n: m for n, m in timed.items() if n in names},
        data,
        batch_sizes,
        quick,
    )
    state = fut.wait() or fut.state
    if not state.is_completed():
        return {}
    report, _ = fut.result()
    out = screen(decide.passing, report)
    if out:
        get_run_logger().info("benchmark: screened out %s", sorted(out))
    return out


def run_params(
    params: OptimizeParams,
    policy: TolerancePolicy,
    plan: RecipePlan,
    model: ModelArtifact,
    prepared: PreparedData,
) -> dict[str, Any]:
    """The optimize run's MLflow params: the options, the resolved recipes and the machine.

    With an accuracy budget, ``accuracy`` is the budget as given (``auto``: defaults per output
    kind); the resolved per-output budget and its ``policy`` are logged once the source's outputs
    are known (flows/budget.py). Otherwise ``policy`` is the given policy or tolerance's.
    """
    budget = params.accuracy_budget()
    return {
        **params.model_dump(exclude={"tolerance", "bench", "tracking_uri", "policy", "accuracy"}),
        "accuracy": budget.text() if budget is not None else "elementwise",
        **({"policy": policy.model_dump(mode="json")} if budget is None else {}),
        "recipes": [r.model_dump(mode="json") for r in plan.recipes],
        "skipped_recipes": plan.skipped,
        "source_sha256": model.provenance.parent_sha256,
        # the unoptimized ONNX on this machine: what the serving tuner serves as the baseline
        # when the source itself is not ONNX (a framework model, a Python callable)
        "converted_model": model.path,
        "synthetic_data": prepared.data.synthetic,
        "hardware": hardware(),
    }


def recipe_params(plan: RecipePlan) -> dict[str, dict[str, Any]]:
    """Each candidate's nested-run params: its passes and session settings."""
    return {
        r.name: {
            "recipe": [p.model_dump(mode="json") for p in r.passes],
            "session": r.session.model_dump(mode="json"),
        }
        for r in plan.recipes
    }
