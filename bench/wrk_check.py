"""Cross-check bladeflow's load generator against wrk (Debian's `wrk`, closed loop).

Serves a small MLP with the real `bladeflow serve` (a throwaway registry), then drives it with
wrk and with tasks/benchmark/openloop.closed_loop at the same concurrency, interleaved in rounds
(wrk, ours, wrk, ours, ...), and compares the medians: QPS and p50 should agree within 10 %.

    .venv/bin/python bench/wrk_check.py [--concurrency 8] [--seconds 5] [--rounds 3]

Needs `wrk` on PATH (`apt-get install wrk`). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bladeflow.tasks.benchmark.openloop import Target, closed_loop
from bladeflow.tasks.benchmark.serving_server import ServerProcess, source_registry


def mlp(path: Path, features: int = 64, hidden: int = 256) -> Path:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((hidden, 4)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, body: bytes, concurrency: int, seconds: float, folder: Path) -> dict:
    script = folder / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    qps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    p50 = float(m.group(1)) * _UNIT[m.group(2)] if m else float("nan")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"qps": qps, "p50_ms": p50, "errors": int(non2xx.group(1)) if non2xx else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    folder = Path(tempfile.mkdtemp(prefix="wrk-check-"))
    served = source_registry(mlp(folder / "mlp.onnx"), "wrk-check", folder)
    server = ServerProcess(served, ["--max-batch-size=8", "--workers=1"], folder / "server.log")
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]}
    ).encode()
    path = f"/v2/models/{served.name}/infer"
    rows: dict[str, list[dict]] = {"wrk": [], "bladeflow": []}
    server.start()
    try:
        server.wait_ready()
        target = Target("127.0.0.1", server.port, path)
        closed_loop(target, [body], args.concurrency, 1.0)  # warm-up
        for _ in range(args.rounds):
            rows["wrk"].append(
                run_wrk(server.url + path, body, args.concurrency, args.seconds, folder)
            )
            r = closed_loop(target, [body], args.concurrency, args.seconds)
            rows["bladeflow"].append({"qps": r.qps, "p50_ms": r.p50_ms, "errors": r.errors})
    finally:
        server.stop()
    med = {
        k: {m: statistics.median(x[m] for x in v) for m in ("qps", "p50_ms")}
        for k, v in rows.items()
    }
    qps_ratio = med["bladeflow"]["qps"] / med["wrk"]["qps"]
    p50_ratio = med["bladeflow"]["p50_ms"] / med["wrk"]["p50_ms"]
    print(
        json.dumps(
            {
                "concurrency": args.concurrency,
                "seconds": args.seconds,
                "rounds": rows,
                "median": med,
                "qps_ratio": round(qps_ratio, 3),
                "p50_ratio": round(p50_ratio, 3),
                "within_10_percent": abs(qps_ratio - 1) <= 0.1 and abs(p50_ratio - 1) <= 0.1,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
