"""Selection, the batch-size guard and incumbent judging from paired rounds."""

from __future__ import annotations

import numpy as np

from bladeflow.core.contract import (
    BenchmarkReport,
    Candidate,
    LatencyStats,
    ModelArtifact,
    PassRecord,
    Provenance,
    Signature,
)
from bladeflow.core.params import Objective
from bladeflow.core.stats import Verdict
from bladeflow.tasks.benchmark.select import (
    BASELINE,
    judge_incumbent,
    more_rounds,
    not_eligible_reason,
    screen,
    select_candidate,
    simplicity,
)
from tests.benchmark.synthetic import rounds

LATENCY1 = Objective(kind="latency", batch=1)


def _stats(bs: int, medians: list[float]) -> LatencyStats:
    p50 = float(np.median(medians))
    return LatencyStats(
        batch_size=bs,
        p50_ms=p50,
        p90_ms=p50,
        p99_ms=p50,
        mean_ms=p50,
        throughput=bs * 1000 / p50,
        iterations=10 * len(medians),
        round_medians_ms=medians,
    )


def _cand(name: str, *passes: str) -> Candidate:
    art = ModelArtifact(
        path="m.onnx",
        format="onnx",
        sha256="0" * 64,
        size_bytes=1,
        signature=Signature(inputs=[], outputs=[]),
        provenance=Provenance(source="m.onnx"),
    )
    return Candidate(name=name, artifact=art, recipe=[PassRecord(name=p) for p in passes])


def _bench(per: dict[str, dict[int, list[float]]]) -> BenchmarkReport:
    return BenchmarkReport(
        models={n: {bs: _stats(bs, m) for bs, m in b.items()} for n, b in per.items()}
    )


DRIFT = [1.0, 1.8, 1.2, 2.4, 1.1, 1.6, 1.3, 2.0]  # the machine's speed, round by round


def _series(ms: float, wobble: list[float]) -> list[float]:
    return [ms * d * w for d, w in zip(DRIFT, wobble, strict=True)]


W1 = [1.00, 1.06, 0.95, 1.03, 0.97, 1.05, 0.96, 1.02]
W2 = [0.97, 0.95, 1.05, 0.98, 1.04, 0.96, 1.04, 0.99]
FLAT = [1.0] * 8


def test_a_tie_goes_to_the_simpler_recipe() -> None:
    # setup: int8 looks 3% faster than ort_graph, within the noise; both clearly beat baseline
    bench = _bench(
        {
            BASELINE: {1: _series(10.0, FLAT)},
            "ort_graph": {1: _series(8.0, W1)},
            "int8": {1: _series(7.8, W2)},
        }
    )
    cands = [_cand(BASELINE), _cand("int8", "int8_dynamic"), _cand("ort_graph", "ort_graph")]
    # execute
    chosen = select_candidate(cands, bench, LATENCY1)
    # assert
    assert chosen.name == "ort_graph"
    assert simplicity(cands[2]) < simplicity(cands[1])


def test_a_simple_candidate_beaten_by_another_is_no_tie_even_if_the_fastest_is_unsure() -> None:
    # setup: "fastest" is noisy (its interval against everything is wide); "smooth" beats
    # "simple" in every round; "simple" would tie with "fastest" alone
    noisy = [0.45, 1.9, 0.5, 0.55, 1.8, 0.5, 1.7, 0.5]  # best median, widest interval
    bench = _bench(
        {
            BASELINE: {1: _series(20.0, FLAT)},
            "simple": {1: _series(9.0, W1)},
            "smooth": {1: _series(7.5, W1)},
            "fastest": {1: _series(8.0, noisy)},
        }
    )
    cands = [
        _cand(BASELINE),
        _cand("simple", "transformer_fusion", "int8_dynamic"),
        _cand("smooth", "transformer_fusion", "smoothquant", "int8_dynamic"),
        _cand("fastest", "transformer_fusion", "smoothquant", "int8_dynamic", "session"),
    ]
    # execute
    chosen = select_candidate(cands, bench, LATENCY1)
    # assert: "simple" is not chosen (smooth beats it); smooth ties the noisy fastest and is simpler
    assert chosen.name == "smooth"


def test_a_significant_win_beats_simplicity() -> None:
    bench = _bench(
        {
            BASELINE: {1: _series(10.0, W1)},
            "ort_graph": {1: _series(9.0, W2)},
            "int8": {1: _series(6.0, W1)},
        }
    )
    cands = [_cand(BASELINE), _cand("ort_graph", "ort_graph"), _cand("int8", "int8_dynamic")]
    assert select_candidate(cands, bench, LATENCY1).name == "int8"


def test_selection_is_stable_from_run_to_run_when_two_candidates_are_equally_fast() -> None:
    # setup: 200 seeded runs of two equally fast candidates on the drifting machine
    rng = np.random.default_rng(7)
    simple, fused = _cand("simple", "ort_graph"), _cand("fused", "ort_graph", "transformer_fusion")
    picks = []
    for _ in range(200):
        a, b = rounds(rng, 1.0)
        bench = _bench({"simple": {1: a}, "fused": {1: b}})
        # execute
        picks.append(select_candidate([fused, simple], bench, LATENCY1).name)
    # assert: a single-ratio rule would flip about half the time
    assert picks.count("simple") / len(picks) >= 0.92


def test_batch_size_guard_uses_the_verdict_not_a_fixed_margin() -> None:
    # setup: at batch 32, int8 is 8% slower every round (significant); "noisy" looks 15% slower
    # by its median but its rounds scatter both ways (not significant)
    noisy32 = [1.45, 0.80, 1.50, 0.85, 1.40, 0.95, 1.30, 0.9]
    bench = _bench(
        {
            BASELINE: {1: _series(10.0, FLAT), 32: _series(100.0, FLAT)},
            "int8": {1: _series(6.0, W1), 32: _series(108.0, W2)},
            "noisy": {1: _series(7.0, W2), 32: _series(100.0, noisy32)},
        }
    )
    # execute
    int8_why = not_eligible_reason(bench, "int8", LATENCY1)
    noisy_why = not_eligible_reason(bench, "noisy", LATENCY1)
    chosen = select_candidate(
        [_cand(BASELINE), _cand("int8", "int8_dynamic"), _cand("noisy", "ort_graph")],
        bench,
        LATENCY1,
    )
    # assert
    assert int8_why is not None and "batch 32" in int8_why and "significantly slower" in int8_why
    assert "[" in int8_why and "\u2013" in int8_why
    assert noisy_why is None and bench.models["noisy"][32].p50_ms > 110
    assert chosen.name == "noisy"
    assert not_eligible_reason(bench, BASELINE, LATENCY1) is None


def test_must_beat_registers_only_when_the_interval_clears_min_speedup() -> None:
    # setup: "a 6% win" inside 10% noise, and a real 1.4x win
    small = _bench({"new": {1: _series(9.4, W1)}, "incumbent": {1: _series(10.0, W2)}})
    big = _bench({"new": {1: _series(7.1, W1)}, "incumbent": {1: _series(10.0, W2)}})
    # execute
    no = judge_incumbent(small, "new", "incumbent", "1", LATENCY1, 1.05)
    yes = judge_incumbent(big, "new", "incumbent", "1", LATENCY1, 1.05)
    # assert
    assert not no.improved and no.ci[0] < 1.05 <= no.ci[1] and no.verdict is Verdict.TIE
    assert "nothing registered" in no.reason and "[" in no.reason and "paired rounds" in no.reason
    assert yes.improved and yes.ci[0] >= 1.05 and yes.verdict is Verdict.FASTER
    assert yes.rounds == 8 and 1.3 < yes.speedup < 1.5


def test_more_rounds_asks_for_the_objective_batch_while_undecided() -> None:
    small = _bench({"new": {1: _series(9.4, W1)}, "incumbent": {1: _series(10.0, W2)}})
    big = _bench({"new": {1: _series(7.1, W1)}, "incumbent": {1: _series(10.0, W2)}})
    more = more_rounds([_cand("new")], LATENCY1, "incumbent", 1.05)
    assert more(small) == 1
    assert more(big) is None


def test_reports_without_rounds_fall_back_to_the_point_estimate() -> None:
    flat = BenchmarkReport(
        models={
            "new": {1: _stats(1, [9.0]).model_copy(update={"round_medians_ms": []})},
            "incumbent": {1: _stats(1, [10.0]).model_copy(update={"round_medians_ms": []})},
        }
    )
    j = judge_incumbent(flat, "new", "incumbent", "1", LATENCY1, 1.05)
    assert j.improved and j.ci == (j.speedup, j.speedup)


def test_report_gives_finite_speedup_intervals_per_batch() -> None:
    bench = _bench(
        {
            "source": {1: _series(10.0, W1), 8: [40.0]},
            "chosen": {1: _series(7.0, W2), 8: [30.0]},
        }
    )
    ci = bench.speedup_ci("chosen", "source")
    assert set(ci) == {1}  # one round at batch 8: no interval to show
    assert 1.3 < ci[1][0] < 10 / 7 < ci[1][1] < 1.6


def test_screening_drops_only_a_candidate_beaten_at_every_batch_size() -> None:
    # setup: "slow" loses to "fused" at batch 1 and 32 (every round); "int8" wins at batch 1 but
    # loses at 32, so nothing dominates it; the baseline is slowest but is never screened out
    bench = _bench(
        {
            BASELINE: {1: _series(10.0, W1), 32: _series(100.0, W2)},
            "fused": {1: _series(6.0, W2), 32: _series(60.0, W1)},
            "slow": {1: _series(8.0, W1), 32: _series(80.0, W2)},
            "int8": {1: _series(4.0, W1), 32: _series(90.0, W2)},
        }
    )
    cands = [
        _cand(BASELINE),
        _cand("fused", "transformer_fusion"),
        _cand("slow", "ort_graph"),
        _cand("int8", "transformer_fusion", "int8_dynamic"),
    ]
    # execute
    out = screen(cands, bench)
    # assert
    assert list(out) == ["slow"]
    assert "fused was significantly faster at every batch size" in out["slow"]
    assert "batch 1: x1.3" in out["slow"] and "batch 32: x1.3" in out["slow"]


def test_screening_keeps_candidates_within_the_noise() -> None:
    # setup: 200 seeded screening runs (5 rounds) of two equally fast candidates
    rng = np.random.default_rng(11)
    a_c, b_c = _cand("a", "ort_graph"), _cand("b", "ort_graph", "transformer_fusion")
    dropped = 0
    for _ in range(200):
        a, b = rounds(rng, 1.0, n=5)
        # execute
        dropped += len(screen([a_c, b_c], _bench({"a": {1: a}, "b": {1: b}})))
    # assert: at 95% per comparison and two comparisons, drops of a tied candidate stay rare
    assert dropped / 200 <= 0.12


def test_more_rounds_while_a_faster_looking_candidate_may_still_beat_the_chosen_one() -> None:
    # setup: "int8" looks 6% faster than the simpler "fused" but ties with it on these rounds
    base, fused = _series(20.0, FLAT), _series(10.0, W1)
    close = _bench({BASELINE: {1: base}, "fused": {1: fused}, "int8": {1: _series(9.5, W2)}})
    cands = [_cand(BASELINE), _cand("fused", "transformer_fusion"), _cand("int8", "f", "q")]
    more = more_rounds(cands, LATENCY1)
    # execute / assert: the choice (the simpler one) rests on a tie that may still break
    assert select_candidate(cands, close, LATENCY1).name == "fused"
    assert more(close) == 1
    # once the faster-looking one is within SAME_SPEED for sure, more rounds cannot matter
    same = _bench({BASELINE: {1: base}, "fused": {1: fused}, "int8": {1: _series(9.95, FLAT)}})
    W1_tight = [1.0 + (w - 1.0) / 20 for w in W1]
    same.models["fused"][1] = _stats(1, _series(10.0, W1_tight))
    assert more(same) is None
    # and a significant win is a decision too: the faster one is chosen, no more rounds
    clear = _bench({BASELINE: {1: base}, "fused": {1: fused}, "int8": {1: _series(6.0, W2)}})
    assert select_candidate(cands, clear, LATENCY1).name == "int8"
    assert more(clear) is None


def test_a_report_that_could_add_rounds_is_judged_at_the_sequential_confidence() -> None:
    from bladeflow.tasks.benchmark.select import speedup_at

    # setup: the same rounds, once from a fixed-round benchmark and once from one that could add
    per = {"new": {1: _series(9.0, W1)}, "old": {1: _series(10.0, W2)}}
    fixed, sequential = _bench(per), _bench(per)
    sequential.planned_rounds = 5
    # execute
    a, b = speedup_at(fixed, "new", "old", 1), speedup_at(sequential, "new", "old", 1)
    # assert: same estimate, a wider interval (the error budget spent across looks)
    assert a.estimate == b.estimate
    assert b.lo < a.lo and b.hi > a.hi
