"""Honest baselines: a Keras MobileNetV2 eager vs as served (tf.function) vs ONNX Runtime.

Run: ``.venv/bin/python -m bench.baselines [--blocks 12] [--calls 20] [--size 96]``. Builds
``keras.applications.MobileNetV2(weights=None)`` in code (no download), saves it as ``.keras``,
converts it with bladeflow's converter and times, at batch 1 and in one process:

- ``keras-eager``: ``model(x, training=False)``, the old source runner (what the 243x was against);
- ``keras-graph``: the same model traced once as a ``tf.function`` / ConcreteFunction, the path a
  TensorFlow service runs (a SavedModel signature) and bladeflow's baseline now;
- ``ort``: the converted ONNX model in ONNX Runtime, default session (the ``baseline`` candidate).

Timing: blocks of ``--calls`` calls per variant, the variants' order rotated block to block, a
short pause between blocks (ONNX Runtime's spinning threads would slow the next variant's first
calls otherwise), the median of each block kept; the result is the median over blocks, and the
ratios come from the same blocks (median of per-block ratios). The graph outputs are checked
against eager before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

Call = Callable[[dict[str, np.ndarray]], Any]


def build(folder: Path, size: int) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        weights=None,
        input_shape=(size, size, 3),
        classes=10,
        classifier_activation=None,  # logits: a softmax of near-equal logits would hide errors
        name="mobilenetv2",
    )
    path = folder / "mobilenetv2.keras"
    model.save(path)
    return path


def variants(path: Path, workdir: Path) -> tuple[dict[str, Call], dict[str, Any]]:
    from bladeflow.core.contract import SessionConfig
    from bladeflow.core.runtime import make_session
    from bladeflow.tasks.convert.base import timing_paths
    from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source, open_source_runner

    artifact = convert_source(str(path), workdir, ConvertOptions())
    runner = open_source_runner(str(path), ConvertOptions(), artifact)
    if runner is None:
        raise SystemExit("the Keras converter gave no source runner")
    served, eager = timing_paths(runner)
    session = make_session(artifact.path, SessionConfig())
    outputs = [o.name for o in artifact.signature.outputs]
    calls = {
        "keras-eager": eager.call,
        "keras-graph": served.call,
        "ort": lambda feeds: session.run(outputs, feeds),
    }
    info = {
        "graph": served.description,
        "eager": eager.description,
        "inputs": [i.name for i in artifact.signature.inputs],
    }
    return calls, info


def check(calls: dict[str, Call], feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference of each variant's first output (the logits) to eager's, relative to
    the largest eager logit (random weights leave MobileNetV2's logits tiny, ~1e-11)."""
    ref = np.asarray(next(iter(calls["keras-eager"](feeds).values())), dtype=np.float64)
    scale = float(np.max(np.abs(ref))) or 1.0
    diffs = {}
    for name, call in calls.items():
        out = call(feeds)
        got = out[0] if isinstance(out, list) else next(iter(out.values()))
        diffs[name] = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref))) / scale
    return diffs


def time_blocks(
    calls: dict[str, Call], feeds: dict[str, np.ndarray], blocks: int, per_block: int
) -> dict[str, list[float]]:
    names = list(calls)
    medians: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up (graph tracing, ORT's arena)
        for _ in range(5):
            calls[name](feeds)
    for b in range(blocks):
        shift = b % len(names)
        for name in names[shift:] + names[:shift]:
            times = []
            for _ in range(per_block):
                t0 = time.perf_counter()
                calls[name](feeds)
                times.append((time.perf_counter() - t0) * 1000.0)
            medians[name].append(statistics.median(times))
            time.sleep(0.05)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--calls", type=int, default=10, help="calls per variant per block")
    parser.add_argument("--size", type=int, default=96, help="input height/width")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import tensorflow as tf

    from bladeflow.core.environment import tool_versions

    with tempfile.TemporaryDirectory(prefix="bench-baselines-") as tmp:
        folder = Path(tmp)
        calls, info = variants(build(folder, args.size), folder / "converted")
        x = np.random.default_rng(0).standard_normal((1, args.size, args.size, 3))
        feeds = {name: x.astype(np.float32) for name in info.pop("inputs")}
        diffs = check(calls, feeds)
        logits = calls["keras-eager"](feeds)
        logits_scale = float(np.max(np.abs(np.asarray(next(iter(logits.values()))))))
        medians = time_blocks(calls, feeds, args.blocks, args.calls)

    def ratio(slow: str, fast: str) -> float:
        return statistics.median(a / b for a, b in zip(medians[slow], medians[fast], strict=True))

    result = {
        "model": f"keras.applications.MobileNetV2(weights=None, input_shape=({args.size}, "
        f"{args.size}, 3), classes=10, classifier_activation=None)",
        "batch": 1,
        "blocks": args.blocks,
        "calls_per_block": args.calls,
        "cpu_threads": os.cpu_count(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "versions": {
            k: v for k, v in tool_versions().items() if k in ("tensorflow-cpu", "onnxruntime")
        },
        "paths": info,
        "max_rel_diff_vs_eager": diffs,
        "logits_max_abs": logits_scale,
        "p50_ms": {n: round(statistics.median(m), 3) for n, m in medians.items()},
        "ratios": {
            "eager/graph": round(ratio("keras-eager", "keras-graph"), 3),
            "eager/ort (the old 'speedup')": round(ratio("keras-eager", "ort"), 3),
            "graph/ort (the honest speedup)": round(ratio("keras-graph", "ort"), 3),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
