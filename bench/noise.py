"""A/A and A/B through the real benchmark: does the speedup interval say what is true?

Run: ``.venv/bin/python -m bench.noise [--rounds 10] [--repeat 3]``. Builds two ONNX models in code:
``a`` (4 square MatMul+Relu layers) and ``b`` (6 of the same layers: 1.5x the work, so about 1.5x
slower), then times ``a``, ``a`` again and ``b`` interleaved with ``bladeflow``'s benchmark and
prints, per batch size, each pair's speedup with its 95% interval and verdict. Expected: a vs
a-again "no significant difference" (an interval that holds 1), b vs a "slower" near x0.67.

``--adaptive S``: then judges ``a5`` (5 layers: 1.25x the work of ``a``) against ``a`` as the
incumbent with ``min_speedup`` 0.80 after 3 rounds, adding rounds for up to S seconds while the
interval straddles 0.80 (``select.more_rounds``), and prints the rounds used and the judgement.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def layers_model(path: Path, layers: int, width: int = 256) -> Path:
    """``x`` -> ``layers`` x (MatMul width x width, Relu) -> ``y``; the same weights per depth."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        f"layers{layers}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def main() -> None:
    from bladeflow.core.contract import SessionConfig
    from bladeflow.core.stats import paired_speedup
    from bladeflow.tasks.benchmark.latency import BenchmarkSettings, benchmark
    from bladeflow.tasks.convert.onnx_source import load_onnx_source
    from bladeflow.tasks.validate.data import synthesize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="independent benchmark runs")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--adaptive", type=float, default=0.0, help="extra-rounds budget, seconds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        a = load_onnx_source(layers_model(d / "a.onnx", 4), d / "ca")
        b = load_onnx_source(layers_model(d / "b.onnx", 6), d / "cb")
        data = synthesize(a.signature, samples=8)
        session = SessionConfig(intra_op_num_threads=1, allow_spinning=False)
        settings = BenchmarkSettings(
            warmup=5, rounds=args.rounds, iterations=args.iterations, max_seconds=60
        )
        print(f"{'run':>3} {'batch':>5}  {'pair':<16} {'speedup [lo-hi] (95%)':<24} verdict")
        for run in range(1, args.repeat + 1):
            t0 = time.perf_counter()
            rep = benchmark(
                {"a": (a, session), "a_again": (a, session), "b": (b, session)},
                data,
                args.batch,
                settings,
            )
            for bs in args.batch:
                m = rep.models
                for new, old in (("a_again", "a"), ("b", "a")):
                    sp = paired_speedup(m[new][bs].round_medians_ms, m[old][bs].round_medians_ms)
                    print(
                        f"{run:>3} {bs:>5}  {new + ' vs ' + old:<16} {sp.text():<24} "
                        f"{sp.verdict.value}"
                    )
            print(f"    ({time.perf_counter() - t0:.1f} s, {args.rounds} rounds)")
        if args.adaptive > 0:
            _adaptive(d, a, session, data, args.adaptive)


def _adaptive(d: Path, a: Any, session: Any, data: Any, budget: float) -> None:
    from bladeflow.core.contract import Candidate
    from bladeflow.core.params import Objective
    from bladeflow.tasks.benchmark.latency import BenchmarkSettings, benchmark
    from bladeflow.tasks.benchmark.select import judge_incumbent, more_rounds
    from bladeflow.tasks.convert.onnx_source import load_onnx_source

    a5 = load_onnx_source(layers_model(d / "a5.onnx", 5), d / "ca5")
    objective = Objective(kind="latency", batch=1)
    more = more_rounds([Candidate(name="a5", artifact=a5)], objective, "a", 0.80)
    settings = BenchmarkSettings(warmup=5, rounds=3, iterations=20, extra_seconds=budget)
    for label, extra in (("fixed 3 rounds", None), (f"adaptive, {budget:g} s budget", more)):
        rep = benchmark({"a": (a, session), "a5": (a5, session)}, data, [1], settings, more=extra)
        j = judge_incumbent(rep, "a5", "a", "1", objective, 0.80)
        print(f"{label}: {j.rounds} rounds, improved={j.improved}: {j.reason}")


if __name__ == "__main__":
    main()
