"""Serving benchmark: the same registered model behind (a) ``mlflow models serve``, (b) ``bladeflow
serve`` with batching off and on, and (c) raw ONNX Runtime in one process; QPS and p50/p99 at
several concurrencies, A/B interleaved over rounds (medians), then a batching sweep.

    .venv/bin/python -m bench.serve.run [--model minilm] [--home DIR] [--seconds 3] [--rounds 2]

Without --home it exports all-MiniLM-L6-v2, registers it through ``bladeflow optimize`` in a
temp BLADEFLOW_HOME and makes that version the champion. The machine is shared: only the ratios
of one run mean anything. Short cells make p99 the few slowest requests of a cell: for tail
latency use cells of 10 s or more.

Before/after a serving change, A B A B in one run: ``--baseline-src DIR`` also serves the model
from another source tree (e.g. ``git archive HEAD | tar -x -C DIR``) as ``before-batch``, with the
same flags as ``bladeflow-batch``; ``--targets`` keeps only the named targets, e.g.
``--targets mlflow-serve,bladeflow-batch,before-batch --concurrency 32 --sweep ""``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.serve.loadgen import ceiling, drive

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
QUERIES = [
    "how do I reset my password",
    "cancel my subscription",
    "where is my order",
    "the app crashes when I open settings",
    "change delivery address",
    "refund for a damaged item",
    "talk to a human please",
    "is there a student discount",
    "update billing information",
    "what are your opening hours",
    "my package arrived late",
    "how to export my data",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(home: Path, name: str, how: str) -> Path:
    """Export MiniLM, register it (``bladeflow optimize`` or directly), make it the champion.

    ``direct`` logs the ONNX file with ``mlflow.onnx.log_model`` and the bladeflow tags, as the
    serving tests do: for machines where the optimize flow is too slow to start.
    """
    from bench.serve.export_minilm import export

    model = export(home / "export")
    tokenizer = model.parent / "tokenizer"
    feeds = token_batches(tokenizer, pad_to=16)
    data = home / "validation.npz"
    np.savez(data, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    env = {**os.environ, "BLADEFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    from mlflow import MlflowClient

    from bladeflow.core.settings import Settings

    s = Settings.from_env(home=home, environ={})
    if how == "optimize":
        cmd = [str(BIN / "bladeflow"), "optimize", str(model), "--name", name, "--data", str(data),
               "--passes", "ort_graph:level=all", "--batch-sizes", "1", "--bench-rounds", "1",
               "--bench-iterations", "3"]  # fmt: skip
        subprocess.run(cmd, check=True, env=env)
        c = MlflowClient(s.tracking_uri, s.registry_uri)
        version = c.get_model_version_by_alias(name, "candidate").version
    else:
        version = _register_direct(s, name, model, tokenizer)
        c = MlflowClient(s.tracking_uri, s.registry_uri)
    c.set_registered_model_alias(name, "champion", version)
    return tokenizer


def _register_direct(s: Any, name: str, model: Path, tokenizer: Path) -> str:
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    from bladeflow.core import registry
    from bladeflow.core.contract import SessionConfig

    s.apply()
    mlflow.set_tracking_uri(s.tracking_uri)
    c = MlflowClient(s.tracking_uri, s.registry_uri)
    if c.get_experiment_by_name(s.experiment) is None:
        c.create_experiment(s.experiment, artifact_location=s.artifact_root)
    mlflow.set_experiment(s.experiment)
    session = SessionConfig()
    runtime = model.parent / registry.RUNTIME_FILE
    runtime.write_text(json.dumps(session.model_dump(mode="json")))
    with mlflow.start_run() as run:
        info = mlflow.onnx.log_model(
            onnx.load(str(model)),
            name="model",
            extra_files=[str(runtime), str(tokenizer)],
            pip_requirements=["onnxruntime"],
        )
    c.create_registered_model(name, tags={registry.MODEL_TAG_CANARY_WEIGHT: "0"})
    tags = {registry.TAG_RECIPE: registry.recipe_json([], session), registry.TAG_VALIDATED: "true"}
    mv = c.create_model_version(
        name, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id, tags=tags
    )
    return str(mv.version)


def token_batches(tokenizer_dir: Path, pad_to: int | None = None) -> list[dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    pad: dict[str, Any] = {"padding": "max_length", "max_length": pad_to} if pad_to else {}
    return [
        {k: np.asarray(v, np.int64) for k, v in tok([q], return_tensors="np", **pad).items()}
        for q in QUERIES
    ]


def v2_body(feeds: dict[str, np.ndarray]) -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel()}
                for k, v in feeds.items()
            ]
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def mlflow_body(feeds: dict[str, np.ndarray]) -> bytes:
    return orjson.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()}})


class Proc:
    def __init__(
        self, cmd: list[str], env: dict[str, str], ready_url: str, log: Path, cwd: Path = ROOT
    ):
        self.ready_url = ready_url
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} exited:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready: {self.proc.args}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def bladeflow_server(
    env: dict[str, str], name: str, logdir: Path, label: str, src: Path = ROOT, **opts: Any
) -> tuple[Proc, str]:
    """``bladeflow serve`` from the source tree ``src`` (``python -m`` imports the cwd's first)."""
    port = free_port()
    cmd = [
        str(BIN / "python"),
        "-m",
        "bladeflow.app.cli",
        "serve",
        "--model",
        name,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--poll-interval",
        "60",
    ]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    url = f"http://127.0.0.1:{port}"
    return Proc(cmd, env, f"{url}/v2/health/ready", logdir / f"{label}.log", cwd=src), url


def raw_ort(
    model_path: Path, feeds: list[dict[str, np.ndarray]], concurrency: int, seconds: float
) -> dict[str, float]:
    """Closed loop of ``concurrency`` threads calling session.run on one query each (no HTTP)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = raw_ort.__dict__.setdefault("sessions", {}).get(str(model_path))
    if sess is None:
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        raw_ort.__dict__["sessions"][str(model_path)] = sess
    lat: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def loop(i: int) -> None:
        mine = []
        for n in range(1_000_000):  # bounded by the deadline
            if time.perf_counter() >= deadline:
                break
            f = feeds[(i + n) % len(feeds)]
            t = time.perf_counter()
            sess.run(None, f)
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = np.asarray(lat) * 1000
    return {
        "qps": len(lat) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "errors": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--home", type=Path, help="BLADEFLOW_HOME that already holds the champion")
    ap.add_argument(
        "--register",
        choices=["optimize", "direct"],
        default="optimize",
        help="without --home: register through `bladeflow optimize` or mlflow.onnx.log_model",
    )
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder (with --home)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per cell")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument(
        "--sweep",
        default="8:2:1,32:2:1,32:5:2",
        help="batch:timeout_ms:workers configs at --sweep-concurrency",
    )
    ap.add_argument("--sweep-concurrency", type=int, default=32)
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="another source tree to serve as target before-batch (A/B a serving change)",
    )
    ap.add_argument(
        "--targets",
        help="comma-separated subset of mlflow-serve, bladeflow-nobatch, bladeflow-batch, "
        "before-batch, raw-ort [default: all]",
    )
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="bladeflow-bench-serve-"))
    tokenizer = args.tokenizer or (home / "export" / "tokenizer")
    if args.home is None:
        tokenizer = prepare(home, args.model, args.register)
    env = {
        **os.environ,
        "BLADEFLOW_HOME": str(home),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow models serve runs `uvicorn`
    from bladeflow.core.settings import Settings

    settings = Settings.from_env(home=home, environ={})
    env["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    feeds = token_batches(tokenizer)
    logdir = home / "bench-logs"
    logdir.mkdir(exist_ok=True)

    # The served model file, for the raw ORT baseline: download the champion once.
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{args.model}@champion", dst_path=str(home / "raw")
        )
    )
    model_path = model_dir / "model.onnx"

    mport = free_port()
    mlflow_proc = Proc(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{args.model}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(mport),
        ],
        env,
        f"http://127.0.0.1:{mport}/ping",
        logdir / "mlflow.log",
    )
    configs = [tuple(int(x) for x in c.split(":")) for c in args.sweep.split(",") if c]
    wanted = set(args.targets.split(",")) if args.targets else None

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    batch_flags: dict[str, Any] = {"max_batch_size": 32, "batch_timeout_ms": 2, "workers": 1}
    servers: dict[str, tuple[Proc, str]] = {}
    if want("bladeflow-nobatch"):
        servers["bladeflow-nobatch"] = bladeflow_server(
            env, args.model, logdir, "nobatch", max_batch_size=1, batch_timeout_ms=0, workers=1
        )
    if want("bladeflow-batch"):
        servers["bladeflow-batch"] = bladeflow_server(
            env, args.model, logdir, "batch", **batch_flags
        )
    if args.baseline_src and want("before-batch"):
        servers["before-batch"] = bladeflow_server(
            env, args.model, logdir, "before", src=args.baseline_src.resolve(), **batch_flags
        )
    sweep_servers = {
        c: bladeflow_server(
            env,
            args.model,
            logdir,
            "sweep-" + "-".join(map(str, c)),
            max_batch_size=c[0],
            batch_timeout_ms=c[1],
            workers=c[2],
        )
        for c in configs
    }
    procs = (
        [mlflow_proc] + [p for p, _ in servers.values()] + [p for p, _ in sweep_servers.values()]
    )
    try:
        for p in procs:
            p.wait_ready()
        if servers:
            live = next(iter(servers.values()))[1] + "/v2/health/live"
            print(
                f"servers ready; client ceiling (GET /v2/health/live, c=32): "
                f"{ceiling(live):.0f} req/s",
                flush=True,
            )
        targets = {
            "mlflow-serve": (
                f"http://127.0.0.1:{mport}/invocations",
                [mlflow_body(f) for f in feeds],
            ),
            **{
                k: (f"{u}/v2/models/{args.model}/infer", [v2_body(f) for f in feeds])
                for k, (_, u) in servers.items()
            },
        }
        if not want("mlflow-serve"):
            del targets["mlflow-serve"]
        for url, bodies in targets.values():  # warm up and check answers
            drive(url, bodies, 2, 0.5)
        cells: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
        conc = [int(c) for c in args.concurrency.split(",")]
        order = [*targets, *(["raw-ort"] if want("raw-ort") else [])]
        for rnd in range(args.rounds):
            for c in conc:
                random.Random(rnd * 100 + c).shuffle(order)
                for name in order:
                    if name == "raw-ort":
                        res = raw_ort(model_path, feeds, c, args.seconds)
                    else:
                        url, bodies = targets[name]
                        r = drive(url, bodies, c, args.seconds)
                        res = {
                            "qps": r.qps,
                            "p50_ms": r.p50_ms,
                            "p99_ms": r.p99_ms,
                            "mean_ms": r.mean_ms,
                            "errors": r.errors,
                        }
                    cells[(name, c)].append(res)
                    print(
                        f"round {rnd} c={c:>2} {name:<18} {_fmt(res)} err {res['errors']}",
                        flush=True,
                    )
        table = _medians(cells)
        _print_main(table, conc)
        sweep: dict[tuple[int, ...], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for cfg in random.Random(rnd).sample(configs, len(configs)):
                url = f"{sweep_servers[cfg][1]}/v2/models/{args.model}/infer"
                r = drive(url, [v2_body(f) for f in feeds], args.sweep_concurrency, args.seconds)
                sweep.setdefault(cfg, []).append(
                    {
                        "qps": r.qps,
                        "p50_ms": r.p50_ms,
                        "p99_ms": r.p99_ms,
                        "mean_ms": r.mean_ms,
                        "errors": r.errors,
                    }
                )
        if configs:
            print(
                f"\nsweep at concurrency {args.sweep_concurrency} (medians of {args.rounds} rounds)"
            )
            print(
                f"{'batch':>5} {'timeout_ms':>10} {'workers':>7}   "
                "qps | p50 ms | p99 ms | mean ms | p99/mean   errors"
            )
        for cfg, rs in sweep.items():
            m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(f"{cfg[0]:>5} {cfg[1]:>10} {cfg[2]:>7} {_fmt(m)} {int(m['errors']):>6}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "main": {f"{k[0]}@{k[1]}": v for k, v in table.items()},
                        "sweep": {":".join(map(str, k)): v for k, v in sweep.items()},
                    },
                    indent=2,
                )
            )
    finally:
        for p in procs:
            p.stop()


def _fmt(r: dict[str, float]) -> str:
    mean = r.get("mean_ms", float("nan"))
    return (
        f"{r['qps']:7.1f} | {r['p50_ms']:6.1f} | {r['p99_ms']:6.1f} | {mean:7.1f} | "
        f"{r['p99_ms'] / mean:4.2f}"
    )


def _medians(
    cells: dict[tuple[str, int], list[dict[str, float]]],
) -> dict[tuple[str, int], dict[str, float]]:
    return {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in cells.items()}


def _print_main(table: dict[tuple[str, int], dict[str, float]], conc: list[int]) -> None:
    names = sorted({k[0] for k in table})
    print("\nmedians (QPS | p50 ms | p99 ms | mean ms | p99/mean)")
    print(f"{'target':<18}" + "".join(f"{'c=' + str(c):>44}" for c in conc))
    for n in names:
        row = "".join(f"{_fmt(table[(n, c)]):>44}" for c in conc)
        print(f"{n:<18}{row}")
    for c in conc:
        for name in ("bladeflow-batch", "before-batch"):
            b = table.get((name, c))
            if not b:
                continue
            parts = []
            m, raw = table.get(("mlflow-serve", c)), table.get(("raw-ort", c))
            if m:
                parts.append(
                    f"{name}/mlflow QPS x{b['qps'] / m['qps']:.2f}, "
                    f"p99 {b['p99_ms']:.0f} vs {m['p99_ms']:.0f} ms"
                )
            if raw:
                parts.append(f"{name}/raw-ort QPS {100 * b['qps'] / raw['qps']:.0f}%")
            if parts:
                print(f"c={c}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
