"""Does the nightly job register on noise? A/A and A/B runs of the real nightly flow (issue #19).

A/A: one model optimized once (v1) and opted in; then ``--runs`` forced nightly checks, nothing
changed. Every check re-optimizes the same source with the same recipes and times the new
candidate against v1 in one interleaved benchmark; none may register a version.

A/B: the same function exported wastefully (hidden layers padded with zero units: identical
outputs, about 1.5x the arithmetic) is optimized as v1; then the source file is replaced by the
lean export and the nightly job runs (the source's hash changed). The lean model must be detected
as faster and registered.

    .venv/bin/python -m bench.nightly_noise --runs 10

Each check prints its outcome, the paired speedup and its 95% interval; the script ends with the
counts. Runs on a fresh BLADEFLOW_HOME (a temporary folder) with the CLI's local Prefect server.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES, HIDDEN, OUTPUTS, BATCH = 256, 1024, 32, 8


def mlp(path: Path, pad: int = 0, seed: int = 0) -> Path:
    """x -> (Linear+Relu) x2 -> Linear; ``pad`` zero units added to each hidden layer."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32) / np.sqrt(FEATURES)
    b1 = rng.standard_normal(HIDDEN).astype(np.float32) * 0.1
    w2 = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / np.sqrt(HIDDEN)
    b2 = rng.standard_normal(HIDDEN).astype(np.float32) * 0.1
    w3 = rng.standard_normal((HIDDEN, OUTPUTS)).astype(np.float32) / np.sqrt(HIDDEN)
    if pad:
        w1 = np.pad(w1, ((0, 0), (0, pad)))
        b1 = np.pad(b1, (0, pad))
        w2 = np.pad(w2, ((0, pad), (0, pad)))
        b2 = np.pad(b2, (0, pad))
        w3 = np.pad(w3, ((0, pad), (0, 0)))
    arrays = (w1, b1, w2, b2, w3)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in zip(arrays, "abcde", strict=True)
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "a"], ["h0"]),
        helper.make_node("Add", ["h0", "b"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "c"], ["h3"]),
        helper.make_node("Add", ["h3", "d"], ["h4"]),
        helper.make_node("Relu", ["h4"], ["h5"]),
        helper.make_node("MatMul", ["h5", "e"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUTPUTS])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="forced A/A nightly checks")
    parser.add_argument("--skip-ab", action="store_true")
    parser.add_argument(
        "--objective", default=f"latency@{BATCH}", help="the optimize objective of both models"
    )
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bladeflow-nightly-noise-"))
    os.environ["BLADEFLOW_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)

    from bladeflow.app.orchestration import use_prefect_api
    from bladeflow.core.settings import Settings

    settings = Settings.from_env()
    # The CLI's warm local Prefect server, set before Prefect is imported (`bladeflow down`).
    use_prefect_api(settings, print)

    from mlflow import MlflowClient

    from bladeflow.core import registry
    from bladeflow.core.params import NightlyParams, OptimizeParams
    from bladeflow.flows.nightly import nightly_flow
    from bladeflow.flows.optimize import optimize_flow

    client = MlflowClient(settings.tracking_uri, settings.registry_uri)
    data = home / "val.npz"
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.standard_normal((32, FEATURES)).astype(np.float32))

    def optimize(name: str, src: Path) -> str:
        params = OptimizeParams(
            source=str(src),
            name=name,
            data=str(data),
            batch_sizes=[BATCH],
            passes="ort_graph:level=all",
            objective=args.objective,
        )
        return optimize_flow(params).version

    def versions(name: str) -> int:
        return len(client.search_model_versions(f"name='{name}'"))

    def show(tag: str, check: object) -> dict:
        row = {
            "run": tag,
            "outcome": str(getattr(check, "outcome", "")),
            "speedup": getattr(check, "speedup", None),
            "speedup_ci": getattr(check, "speedup_ci", None),
            "new_version": getattr(check, "new_version", None),
            "reason": getattr(check, "reason", ""),
        }
        print(json.dumps(row), flush=True)
        return row

    rows = []
    # --- A/A
    src = mlp(home / "aa.onnx")
    optimize("aa", src)
    client.set_registered_model_tag("aa", registry.MODEL_TAG_NIGHTLY, "true")
    started = time.monotonic()
    for i in range(args.runs):
        (check,) = nightly_flow(NightlyParams(models=["aa"], force=True, tune_serving=False))
        rows.append(show(f"A/A {i + 1}", check))
    aa_registered = versions("aa") - 1
    print(
        f"A/A: {args.runs} forced checks in {time.monotonic() - started:.0f} s, "
        f"{aa_registered} version(s) registered",
        flush=True,
    )
    # --- A/B
    if not args.skip_ab:
        src = home / "ab.onnx"
        mlp(src, pad=HIDDEN // 4)  # ~1.5x the MACs of the lean model, same outputs
        optimize("ab", src)
        client.set_registered_model_tag("ab", registry.MODEL_TAG_NIGHTLY, "true")
        mlp(src)  # the source is re-exported lean: nightly sees a new hash
        (check,) = nightly_flow(NightlyParams(models=["ab"], tune_serving=False))
        rows.append(show("A/B", check))
        print(f"A/B: {versions('ab') - 1} version(s) registered", flush=True)
    (home / "nightly_noise.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"rows in {home / 'nightly_noise.json'}; then: BLADEFLOW_HOME={home} bladeflow down")


if __name__ == "__main__":
    main()
