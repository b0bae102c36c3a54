"""The search behind ``bladeflow tune-serving``: the configuration that sustains the most
requests per second within a p99 SLO, measured on the real server with open-loop load.

For each configuration (max batch size, batch timeout, workers, intra-op threads, queue size) a
server is started (:mod:`.serving_server`) and driven by :mod:`.openloop` at rising rates: a short
closed-loop probe estimates its capacity, the first step runs at half of it, each passing step
raises the rate by 25 %, a failing one ends the climb, and up to two steps bisect between the last
pass and the first fail. A step passes when every request answered 200 and the p99's 95 % interval
(:func:`bladeflow.core.stats.quantile_interval`) lies at or under the SLO; an undecided step is run
once more with its samples pooled, and what is still undecided counts as a fail (a sustained rate
must be shown, not hoped for). The sustained rate of a configuration is its highest passing rate.

The search is coarse to fine, within a time budget: the defaults and a coarse grid (batch 1 and 8,
1 and 2 workers) first, then the neighbours of the best (batch x0.5/x2, timeout 1/5 ms) while the
budget lasts. The servers of one stage start together (start-up, mostly importing MLflow, is
~10-20 s on two busy cores) and wait idle while another is measured.

Configurations are measured one after another, so one noisy moment (a neighbour taking the
shared cores for a few seconds) can end one climb early and decide the winner: two identical runs
on MiniLM gave the default 70.6/s and 391.9/s. So when the search's best is not the default, a
confirmation phase (:func:`_confirm`) climbs the default and the best again, interleaved
(D B D B), on the servers the search kept running, in ``CONFIRM_SHARE`` of the budget set aside
for it; the best replaces the default only when it is faster by more than ``SAME_SPEED``
(:func:`decide`), and the gain is the confirmation's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bladeflow.core.stats import quantile_interval
from bladeflow.tasks.benchmark.openloop import StepResult, Target, closed_loop, open_loop
from bladeflow.tasks.benchmark.select import SAME_SPEED
from bladeflow.tasks.benchmark.serving_server import (
    ServedModel,
    ServerProcess,
    ServerSample,
    histogram_quantile,
    scrape,
)

Say = Callable[[str], None]
RAISE = 1.25  # each passing step raises the rate by this factor
MAX_STEPS = 9  # per configuration
MIN_STEP_S, MAX_STEP_S, STEP_REQUESTS = 1.5, 4.0, 400  # a step lasts ~STEP_REQUESTS requests
PROBE_S = 1.0
MIN_CONFIG_S = 15.0  # a configuration gets at least this long (start-up share + a few steps)
SIMPLER_WITHIN = 0.05  # configurations within 5 % of the best rate: the simpler one wins
# The confirmation (see the module docstring): this share of a model's budget is kept from the
# search for it (returned to the caller when the search's best is the default); rounds of D B.
CONFIRM_SHARE = 0.3
CONFIRM_ROUNDS = 2
CONFIRM_MAX_STEPS = 6  # per confirmation climb: it starts next to the search's rates
MIN_CLIMB_S = 8.0  # the least a confirmation climb gets: 1 s warm-up and ~3 steps


def machine_cores() -> int:
    """Cores this process may run on (the server and the load generator share them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ServingConfig(BaseModel):
    """The ``bladeflow serve`` settings the tuner varies (the keys of the version tag)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(32, ge=1)
    batch_timeout_ms: float = Field(2.0, ge=0)
    max_queue_size: int = Field(256, ge=1)
    workers: int = Field(1, ge=1)
    intra_op_threads: int = Field(0, ge=0, description="0: the recipe's setting")

    def flags(self) -> list[str]:
        return [
            f"--max-batch-size={self.max_batch_size}",
            f"--batch-timeout-ms={self.batch_timeout_ms:g}",
            f"--max-queue-size={self.max_queue_size}",
            f"--workers={self.workers}",
            f"--intra-op-threads={self.intra_op_threads}",
        ]

    def label(self) -> str:
        threads = self.intra_op_threads or "recipe"
        return (
            f"batch {self.max_batch_size}, {self.batch_timeout_ms:g} ms, "
            f"{self.workers} worker(s) x {threads} thread(s), queue {self.max_queue_size}"
        )

    def simplicity(self) -> tuple[int, int, float]:
        return (self.workers, self.max_batch_size, self.batch_timeout_ms)


DEFAULT_CONFIG = ServingConfig()  # what `bladeflow serve` runs without flags or tag


class Step(BaseModel):
    """One open-loop step: the client's view (from scheduled times) and the server's."""

    rate: float
    passed: bool
    sent: int
    errors: int
    client_qps: float
    client_p50_ms: float
    client_p99_ms: float
    p99_ci_ms: tuple[float, float] | None
    send_lag_p99_ms: float
    server_qps: float
    server_p50_ms: float
    server_p99_ms: float
    server_cpu_cores: float


class ConfigResult(BaseModel):
    """What one configuration sustained, and the steps that showed it."""

    config: ServingConfig
    stage: str  # default, coarse, fine, confirm
    round: int | None = None  # the confirmation round (1, 2, ...) of a "confirm" climb
    sustained_qps: float = 0.0  # highest passing rate (0: not even the lowest step passed)
    probe_qps: float = 0.0
    at_sustained: Step | None = None
    steps: list[Step] = Field(default_factory=list)
    startup_s: float = 0.0
    seconds: float = 0.0
    error: str | None = None

    def row(self) -> dict[str, Any]:
        """One row of the table: the config and the client/server columns at its sustained rate."""
        s = self.at_sustained
        c = self.config

        def num(v: float | None, nd: int = 1) -> float | None:
            return None if v is None or not math.isfinite(v) else round(v, nd)

        return {
            "stage": self.stage,
            "round": self.round,
            "max_batch_size": c.max_batch_size,
            "batch_timeout_ms": c.batch_timeout_ms,
            "workers": c.workers,
            "intra_op_threads": c.intra_op_threads,
            "max_queue_size": c.max_queue_size,
            "sustained_qps": num(self.sustained_qps),
            "client_qps": num(s.client_qps) if s else None,
            "client_p50_ms": num(s.client_p50_ms, 2) if s else None,
            "client_p99_ms": num(s.client_p99_ms, 2) if s else None,
            "server_qps": num(s.server_qps) if s else None,
            "server_p50_ms": num(s.server_p50_ms, 2) if s else None,
            "server_p99_ms": num(s.server_p99_ms, 2) if s else None,
            "server_cpu_cores": num(s.server_cpu_cores, 2) if s else None,
            "steps": len(self.steps),
            "error": self.error,
        }


class Confirmation(BaseModel):
    """The default and the search's best climbed again, interleaved, and what that decided."""

    challenger: ServingConfig  # the search's best
    planned_rounds: int
    rounds: int  # rounds run: each one climb of the default, then one of the challenger
    default_qps: list[float]  # sustained rate of each of the default's climbs, in round order
    challenger_qps: list[float]
    default_confirmed_qps: float  # the highest of its climbs (see decide)
    challenger_confirmed_qps: float
    gain: float | None  # challenger / default, confirmed; None when the default sustained nothing
    search_gain: float | None  # the same ratio from the search's single climbs, for comparison
    challenger_wins: bool
    reason: str


class ModelTuning(BaseModel):
    """The search over one served model (the chosen version, or the source).

    ``best`` and ``default`` are the confirmation's climbs when one ran (``best`` is then the
    default's when the challenger did not win), else the search's.
    """

    label: str
    name: str
    version: str
    results: list[ConfigResult]
    best: ConfigResult | None
    default: ConfigResult | None
    seconds: float
    confirmation: Confirmation | None = None


# -- one step, one configuration -------------------------------------------------------------


def step_duration(rate: float) -> float:
    return min(MAX_STEP_S, max(MIN_STEP_S, STEP_REQUESTS / max(rate, 1e-9)))


def p99_interval(latencies_ms: np.ndarray) -> tuple[float, float] | None:
    """The p99's 95 % interval from raw samples: each sample is its own histogram bucket."""
    if len(latencies_ms) == 0:
        return None
    ordered = np.sort(latencies_ms)
    buckets = {float(v): float(i + 1) for i, v in enumerate(ordered)}  # ties keep the last rank
    return quantile_interval(buckets, 0.99)


def judge(latencies_ms: np.ndarray, errors: int, slo_ms: float) -> bool | None:
    """True: the p99 is within the SLO at 95 %; False: it is not, or a request failed; None:
    the interval straddles the SLO (more samples could decide)."""
    if errors:
        return False
    ci = p99_interval(latencies_ms)
    if ci is None:
        return False
    if ci[1] <= slo_ms:
        return True
    if ci[0] > slo_ms:
        return False
    return None


def run_step(
    server: ServerProcess, target: Target, bodies: Sequence[bytes], rate: float, slo_ms: float
) -> Step:
    seconds = step_duration(rate)
    before, cpu0, t0 = scrape(server.url, server.model.name), server.cpu_seconds(), time.monotonic()
    res = open_loop(target, bodies, rate, seconds, seed=int(rate * 1000) % 100_003)
    verdict = judge(res.latencies_ms, res.errors, slo_ms)
    if verdict is None:  # undecided: pool a second run at the same rate
        more = open_loop(target, bodies, rate, seconds, seed=int(rate * 1000) % 100_003 + 1)
        res = _pooled(res, more)
        verdict = bool(judge(res.latencies_ms, res.errors, slo_ms))
    wall = max(time.monotonic() - t0, 1e-9)
    server_d: ServerSample = scrape(server.url, server.model.name).minus(before)
    cpu = (server.cpu_seconds() - cpu0) / wall
    ci = p99_interval(res.latencies_ms)
    return Step(
        rate=round(rate, 2),
        passed=verdict,
        sent=res.sent,
        errors=res.errors,
        client_qps=res.qps,
        client_p50_ms=res.percentile(50),
        client_p99_ms=res.percentile(99),
        p99_ci_ms=ci,
        send_lag_p99_ms=res.send_lag_p99_ms,
        server_qps=server_d.ok / res.elapsed if res.elapsed else 0.0,
        server_p50_ms=histogram_quantile(server_d.buckets, 0.5) * 1000,
        server_p99_ms=histogram_quantile(server_d.buckets, 0.99) * 1000,
        server_cpu_cores=cpu,
    )


def _pooled(a: StepResult, b: StepResult) -> StepResult:
    return StepResult(
        rate=a.rate,
        seconds=a.seconds + b.seconds,
        sent=a.sent + b.sent,
        ok=a.ok + b.ok,
        errors=a.errors + b.errors,
        latencies_ms=np.concatenate([a.latencies_ms, b.latencies_ms]),
        send_lag_ms=np.concatenate([a.send_lag_ms, b.send_lag_ms]),
        elapsed=a.elapsed + b.elapsed,
    )


def measure(
    server: ServerProcess,
    bodies: Sequence[bytes],
    slo_ms: float,
    result: ConfigResult,
    deadline: float,
    say: Say | None = None,
    *,
    start: float | None = None,
    max_steps: int = MAX_STEPS,
) -> ConfigResult:
    """Climb the rate ladder on one running server; fill ``result``'s steps and sustained rate.

    ``start``: the first step's rate (default: half the closed-loop probe's rate). A step starts
    only when it fits before ``deadline``.
    """
    t0 = time.monotonic()
    target = Target("127.0.0.1", server.port, f"/v2/models/{server.model.name}/infer")
    c = result.config
    concurrency = min(64, max(4, 2 * c.max_batch_size * c.workers))
    probe = closed_loop(target, bodies, concurrency, PROBE_S)  # also the warm-up
    result.probe_qps = probe.qps
    rate = max(1.0, start if start is not None else 0.5 * probe.qps)
    lo: Step | None = None  # highest pass
    hi: float | None = None  # lowest fail
    refinements = 0
    while len(result.steps) < max_steps and time.monotonic() + step_duration(rate) < deadline:
        step = run_step(server, target, bodies, rate, slo_ms)
        result.steps.append(step)
        if say:
            say(
                f"  {rate:8.1f}/s  p99 {step.client_p99_ms:7.2f} ms  "
                f"{'pass' if step.passed else 'FAIL'}  (server {step.server_qps:.0f}/s)"
            )
        if step.passed:
            lo = step if lo is None or step.rate > lo.rate else lo
        else:
            hi = rate if hi is None else min(hi, rate)
        if hi is None:
            rate *= RAISE
        elif lo is None:
            rate /= 2
            if rate < 1.0:
                break
        elif hi / lo.rate > 1.08 and refinements < 2:
            refinements += 1
            rate = math.sqrt(hi * lo.rate)
        else:
            break
    result.at_sustained = lo
    result.sustained_qps = lo.rate if lo else 0.0
    result.seconds = time.monotonic() - t0
    return result


# -- the search --------------------------------------------------------------------------------


def coarse_grid(cores: int) -> list[ServingConfig]:
    """Batch 1 and 8 with 1 and 2 workers (threads: the cores split between the workers)."""
    out = []
    for workers in sorted({1, min(2, cores)}):
        threads = max(1, cores // workers)
        for batch in (1, 8):
            out.append(
                ServingConfig(max_batch_size=batch, workers=workers, intra_op_threads=threads)
            )
    return out


def neighbours(best: ServingConfig) -> list[ServingConfig]:
    """The fine stage: the best's batch halved/doubled, then its batch timeout at 1 and 5 ms."""
    sizes = (1, 4, 8, 16, 32)
    out = []
    for batch in (best.max_batch_size // 2, best.max_batch_size * 2):
        if batch in sizes and batch != best.max_batch_size:
            out.append(best.model_copy(update={"max_batch_size": batch}))
    if best.max_batch_size > 1:
        for timeout in (1.0, 5.0):
            if timeout != best.batch_timeout_ms:
                out.append(best.model_copy(update={"batch_timeout_ms": timeout}))
    return out


def choose(results: Sequence[ConfigResult]) -> ConfigResult | None:
    """The highest sustained rate; within ``SIMPLER_WITHIN`` of it, the simplest configuration
    (fewer workers, smaller batches, shorter timeout): the ladder cannot tell those apart."""
    ok = [r for r in results if r.sustained_qps > 0]
    if not ok:
        return None
    top = max(r.sustained_qps for r in ok)
    close = [r for r in ok if r.sustained_qps >= top * (1 - SIMPLER_WITHIN)]
    return min(close, key=lambda r: r.config.simplicity())


def tune_model(
    model: ServedModel,
    bodies: Sequence[bytes],
    slo_ms: float,
    budget_s: float,
    workdir: Path,
    *,
    cores: int | None = None,
    fine: bool = True,
    first: Sequence[ServingConfig] = (),
    confirm: bool = True,
    say: Say | None = None,
) -> ModelTuning:
    """Search the configurations of ``model`` within ``budget_s`` seconds (coarse, then fine),
    then confirm a best that is not the default against the default (:func:`_confirm`).

    ``first``: configurations measured with the defaults, before the coarse grid (the source
    tries the version's winner there, so a short budget still gives it a tuned configuration).
    ``confirm``: keep ``CONFIRM_SHARE`` of the budget for the confirmation; without it the
    search's best stands unconfirmed (the source's search, which only feeds the capacity).
    When the search's best is the default, the function returns early, leaving that share unused.
    """
    t0 = time.monotonic()
    deadline = t0 + budget_s
    search_s = budget_s
    if confirm:  # never below the time of a start-up and two configurations (the default and
        # one challenger, tune_model's rule below): with less, there is nothing to confirm
        search_s = max(budget_s * (1 - CONFIRM_SHARE), min(budget_s, 3 * MIN_CONFIG_S))
    search_deadline = t0 + search_s
    cores = cores or machine_cores()
    results: list[ConfigResult] = []
    stages: list[tuple[str, list[ServingConfig]]] = [
        ("default", [DEFAULT_CONFIG]),
        ("coarse", list(dict.fromkeys([*first, *coarse_grid(cores)]))),
    ]
    cost = MIN_CONFIG_S  # seconds one configuration takes (start-up + measuring), for the budget
    # The default's and the best's servers stay up for the confirmation (no second start-up).
    kept: dict[ServingConfig, ServerProcess] = {}
    try:
        while stages and time.monotonic() < search_deadline:
            stage, configs = stages.pop(0)
            if stage == "default":  # measured with the coarse stage: one start-up for both
                stage2, more = stages.pop(0)
                batch = [ConfigResult(config=c, stage="default") for c in configs] + [
                    ConfigResult(config=c, stage=stage2) for c in more if c != DEFAULT_CONFIG
                ]
            else:
                seen = {r.config for r in results}
                batch = [ConfigResult(config=c, stage=stage) for c in configs if c not in seen]
            fits = int((search_deadline - time.monotonic()) / cost) - 1  # start-up ~= one config
            batch = batch[: max(0, fits)]
            if not batch:
                break
            # The fine stage's configurations (up to 4) get their share of what is left.
            reserve = 4 if fine and stage in {"default", "coarse"} else 0
            procs = _measure_stage(
                model, batch, bodies, slo_ms, search_deadline, reserve, workdir, say
            )
            results += batch
            best = choose(results)
            wanted = {DEFAULT_CONFIG, best.config} if confirm and best is not None else set()
            for result, proc in zip(batch, procs, strict=True):
                if result.config in wanted and result.error is None:
                    kept[result.config] = proc
                else:
                    proc.stop()
            for config in [c for c in kept if c not in wanted]:
                kept.pop(config).stop()
            measured = [r for r in batch if r.error is None]
            if measured:
                cost = max(cost, sum(r.seconds + r.startup_s for r in measured) / len(measured))
            if fine and stage in {"default", "coarse"} and best is not None:
                stages.append(("fine", neighbours(best.config)))
        best = choose(results)
        default = next((r for r in results if r.stage == "default"), None)
        confirmation: Confirmation | None = None
        # A default that could not be measured (its server failed) cannot be climbed again:
        # the search's best stands, with no gain to report.
        if (
            confirm
            and best is not None
            and default is not None
            and default.error is None
            and best is not default
        ):
            climbs, confirmation = _confirm(kept, default, best, bodies, slo_ms, deadline, say)
            results += climbs
            best, default = _confirmed(climbs, confirmation, best, default)
    finally:
        for proc in kept.values():
            proc.stop()
    return ModelTuning(
        label=model.label,
        name=model.name,
        version=model.version,
        results=results,
        best=best,
        default=default,
        seconds=time.monotonic() - t0,
        confirmation=confirmation,
    )


def _measure_stage(
    model: ServedModel,
    batch: list[ConfigResult],
    bodies: Sequence[bytes],
    slo_ms: float,
    deadline: float,
    reserve: int,
    workdir: Path,
    say: Say | None,
) -> list[ServerProcess]:
    """Start the stage's servers together, then measure each within its slice of the time left
    (``reserve`` more configurations are still to come after this stage). The servers are
    returned running: the caller stops them (all of them are stopped here if this raises)."""
    procs = [
        ServerProcess(
            model, r.config.flags(), workdir / "logs" / f"{model.label}-{r.stage}-{i}.log"
        )
        for i, r in enumerate(batch)
    ]
    t0 = time.monotonic()
    try:
        for p in procs:  # start-ups overlap
            p.start()
        for p in procs:
            p.wait_ready()
        startup = time.monotonic() - t0
        for i, (proc, result) in enumerate(zip(procs, batch, strict=True)):
            result.startup_s = startup / len(batch)
            left = deadline - time.monotonic()
            share = left / (len(batch) - i + reserve)
            until = min(deadline, time.monotonic() + share)
            if say:
                say(f"{model.label} v{model.version} [{result.stage}] {result.config.label()}")
            try:
                measure(proc, bodies, slo_ms, result, until, say)
            except (OSError, RuntimeError) as exc:  # this configuration could not be measured
                result.error = f"{type(exc).__name__}: {exc}"[:300]
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


# -- the confirmation ---------------------------------------------------------------------------


def decide(
    default_qps: Sequence[float],
    challenger_qps: Sequence[float],
    challenger: ServingConfig,
    *,
    planned_rounds: int = CONFIRM_ROUNDS,
    search_gain: float | None = None,
    short: str = "",
) -> Confirmation:
    """The confirmation's verdict from each configuration's climbs (interleaved, same count).

    A climb stops rising at its first failing step, and a busy neighbour can only make a step
    fail, never pass (a pass needs the p99's whole 95 % interval within the SLO): noise lowers a
    climb's rate and does not raise it. So a configuration's confirmed rate is the highest of its
    climbs, the rate it has shown it sustains; both got the same number of climbs, interleaved,
    so the same chances. (A mean or a paired ratio would let one disturbed climb decide again:
    the default's 70.6/s and 391.9/s average 231/s, and a 257/s challenger would replace a
    default that sustained 391.9/s.) The challenger replaces the default only when faster by
    more than ``SAME_SPEED``; within that, the default stays: it must be beaten by more than the
    noise.

    Args:
        default_qps: the default's sustained rate in each of its confirmation climbs.
        challenger_qps: the challenger's, in the same rounds.
        challenger: the search's best configuration.
        planned_rounds: the rounds the confirmation wanted (fewer ran when time was short).
        search_gain: challenger / default from the search, shown beside the confirmed gain.
        short: why fewer rounds than planned ran (empty when all ran).
    """
    if len(default_qps) != len(challenger_qps):
        raise ValueError(
            f"the default has {len(default_qps)} climbs and the challenger "
            f"{len(challenger_qps)}: the confirmation climbs both in every round"
        )
    rounds = len(default_qps)
    d, c = max(default_qps, default=0.0), max(challenger_qps, default=0.0)
    gain = round(c / d, 3) if d > 0 else None
    searched = f" (x{search_gain:g} in the search)" if search_gain else ""
    counted = f"{rounds} interleaved round(s) of {planned_rounds} planned" + (
        f": {short}" if short else ""
    )
    if rounds == 0:
        wins = False
        reason = (
            f"not confirmed ({short or 'no time left'}): the search's best{searched} was not "
            "climbed again against the default, so the default configuration stays"
        )
    elif d <= 0:
        wins = c > 0
        reason = (
            f"the default sustained no tried rate in {counted}; the challenger sustained {c:.1f}/s"
            if wins
            else f"neither sustained a tried rate in {counted}: the default configuration stays"
        )
    else:
        wins = c > SAME_SPEED * d
        verdict = (
            f"more than x{SAME_SPEED:g}: the challenger wins"
            if wins
            else f"not more than x{SAME_SPEED:g}: the default configuration stays"
        )
        reason = (
            f"confirmed in {counted}: challenger ({challenger.label()}) {c:.1f}/s vs default "
            f"{d:.1f}/s (best climb of each), x{c / d:.3f}{searched}, {verdict}"
        )
    return Confirmation(
        challenger=challenger,
        planned_rounds=planned_rounds,
        rounds=rounds,
        default_qps=[round(v, 2) for v in default_qps],
        challenger_qps=[round(v, 2) for v in challenger_qps],
        default_confirmed_qps=round(d, 2),
        challenger_confirmed_qps=round(c, 2),
        gain=gain,
        search_gain=search_gain,
        challenger_wins=wins,
        reason=reason,
    )


def confirm_rounds(left_s: float, planned: int = CONFIRM_ROUNDS) -> int:
    """How many D B rounds fit in ``left_s`` seconds (each climb needs ``MIN_CLIMB_S``)."""
    return max(0, min(planned, int(left_s / (2 * MIN_CLIMB_S))))


def _confirm(
    kept: dict[ServingConfig, ServerProcess],
    default: ConfigResult,
    best: ConfigResult,
    bodies: Sequence[bytes],
    slo_ms: float,
    deadline: float,
    say: Say | None,
) -> tuple[list[ConfigResult], Confirmation]:
    """Climb the default and ``best`` again, D B D B, on their kept servers until ``deadline``.

    Each climb is a full climb as :func:`measure` does it, only shorter: both start at the same
    rate, one step under the higher of the two search rates, so both use the same rate ladder and
    reach their limits in a few steps (a fixed-rate check at the search's rates could not show a
    default that the search under-measured by 5x, as seen on MiniLM). With ``CONFIRM_MAX_STEPS``
    a climb reaches at most ~2.4x the higher search rate; two climbs that both pass up there tie,
    and the default stays.
    """
    search_gain = (
        round(best.sustained_qps / default.sustained_qps, 3) if default.sustained_qps else None
    )
    left = deadline - time.monotonic()
    rounds = confirm_rounds(left)
    short = ""
    if rounds < CONFIRM_ROUNDS:
        short = (
            f"the search left {max(left, 0.0):.0f} s, {2 * CONFIRM_ROUNDS * MIN_CLIMB_S:g} s "
            f"needed for {CONFIRM_ROUNDS} rounds; give a larger --budget-s"
        )
    missing = [r.config.label() for r in (default, best) if r.config not in kept]
    if missing and rounds:
        rounds = 0
        short = f"the server of {' and '.join(missing)} failed in the search"
    start = max(default.sustained_qps, best.sustained_qps, 1.0) / RAISE
    climbs: list[ConfigResult] = []
    for i in range(2 * rounds):
        config = (default, best)[i % 2].config
        result = ConfigResult(config=config, stage="confirm", round=i // 2 + 1)
        until = time.monotonic() + (deadline - time.monotonic()) / (2 * rounds - i)
        if say:
            say(f"confirm round {result.round}/{rounds}: {config.label()}")
        try:
            measure(
                kept[config], bodies, slo_ms, result, min(until, deadline), say,
                start=start, max_steps=CONFIRM_MAX_STEPS,
            )  # fmt: skip
        except (OSError, RuntimeError) as exc:  # counts as a climb that sustained nothing
            result.error = f"{type(exc).__name__}: {exc}"[:300]
        climbs.append(result)
    verdict = decide(
        [r.sustained_qps for r in climbs[0::2]],
        [r.sustained_qps for r in climbs[1::2]],
        best.config,
        search_gain=search_gain,
        short=short,
    )
    if say:
        say(verdict.reason)
    return climbs, verdict


def _confirmed(
    climbs: list[ConfigResult],
    verdict: Confirmation,
    best: ConfigResult,
    default: ConfigResult,
) -> tuple[ConfigResult, ConfigResult]:
    """(best, default) after the confirmation: each one's highest climb, the default as best
    unless the challenger won; the search's results when no climb ran."""
    if not climbs:
        return default, default
    top_default = max(climbs[0::2], key=lambda r: r.sustained_qps)
    top_challenger = max(climbs[1::2], key=lambda r: r.sustained_qps)
    return (top_challenger if verdict.challenger_wins else top_default), top_default
