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

``--tune`` runs ``bladeflow tune-serving NAME VERSION --json`` on the bench's version first (timed,
wall seconds; the table and the chosen configuration go into ``--json``/``--markdown``), which
sets the version tag ``bladeflow.serving_config``, and adds the target ``bladeflow-tuned``:
``bladeflow serve`` without serving flags, so it runs the tag's configuration. Every other
``bladeflow serve`` target pins all five serving flags (a flag beats the tag key by key, so a
target that gave only some of them would take the rest from the tag). Issue #17's targets are
checked at the end (at concurrency 32); the tuned/default ratio is the tuner's own, measured
open-loop at the p99 SLO, the rest are this run's closed-loop medians.
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
# `bladeflow serve`'s defaults (ServeOptions), given as flags: a target that passes all five runs
# them even when the version carries a bladeflow.serving_config tag.
DEFAULT_SERVE: dict[str, Any] = {
    "max_batch_size": 32,
    "batch_timeout_ms": 2,
    "max_queue_size": 256,
    "workers": 1,
    "intra_op_threads": 0,
}
TUNED = "bladeflow-tuned"  # bladeflow serve (tuned): no serving flags, the tag's configuration
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
    arrays: dict[str, Any] = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    np.savez(data, **arrays)
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
                raise RuntimeError(f"{self.proc.args!r} exited:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready: {self.proc.args!r}")

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


def pinned_flags(src: Path, **flags: Any) -> dict[str, Any]:
    """``flags`` over the defaults, all five: for a source tree whose ``bladeflow serve`` reads the
    ``bladeflow.serving_config`` tag (and has all five flags); older trees get ``flags`` only."""
    cli = src / "bladeflow" / "app" / "serve_cli.py"
    if cli.is_file() and "--intra-op-threads" not in cli.read_text():
        return flags
    return {**DEFAULT_SERVE, **flags}


def tune_version(
    env: dict[str, str],
    name: str,
    version: str,
    logdir: Path,
    *,
    slo_p99_ms: float,
    budget_s: float,
    source: bool,
) -> dict[str, Any]:
    """Run ``bladeflow tune-serving NAME VERSION --json`` (its progress to stderr and
    ``tune.log``), timed in wall seconds. Returns the command, ``wall_s``, ``exit_code`` and the
    tuner's JSON as ``result`` (None when it failed)."""
    cmd = [str(BIN / "python"), "-m", "bladeflow.app.cli", "tune-serving", name, version,
           "--slo-p99-ms", f"{slo_p99_ms:g}", "--budget-s", f"{budget_s:g}", "--json"]  # fmt: skip
    if not source:
        cmd.append("--no-source")
    shown = " ".join(["bladeflow", *cmd[3:]])
    print(f"tuning: {shown}", flush=True)
    log = logdir / "tune.log"
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        err, std = proc.stderr, proc.stdout
        assert err is not None and std is not None  # both are PIPEs

        def tee() -> None:
            for line in err:
                sys.stderr.write(line)
                out.write(line)

        copier = threading.Thread(target=tee, daemon=True)
        copier.start()
        stdout = std.read()
        rc = proc.wait()
        copier.join(10)
    wall = time.monotonic() - t0
    result = None
    if rc == 0:
        try:
            result = json.loads(stdout)
        except json.JSONDecodeError:
            rc = -1
            print(f"tune-serving printed no JSON on stdout:\n{stdout[-2000:]}", flush=True)
    (logdir / "tune.json").write_text(stdout)
    print(f"tuning took {wall:.1f} s wall (exit {rc}; log {log})", flush=True)
    return {"command": shown, "wall_s": round(wall, 1), "exit_code": rc, "result": result,
            "log": str(log)}  # fmt: skip


def served_config(url: str, name: str) -> dict[str, Any] | None:
    """The serving configuration a ``bladeflow serve`` runs the champion with, and its origin
    (``from``: defaults, flags or tag), from ``GET /v2/models/NAME``."""
    try:
        doc = httpx.get(f"{url}/v2/models/{name}", timeout=10).json()
        configs = doc["bladeflow"]["serving_config"]
    except (httpx.HTTPError, KeyError, ValueError, TypeError):
        return None  # an older tree without the field (before-batch)
    return dict(next(iter(configs.values()))) if configs else None


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
        f"{TUNED} (with --tune), before-batch, raw-ort [default: all]",
    )
    ap.add_argument(
        "--tune",
        action="store_true",
        help="run `bladeflow tune-serving` on the version first (sets its serving_config tag) "
        f"and add the target {TUNED}: bladeflow serve with the tag's configuration",
    )
    ap.add_argument("--tune-budget-s", type=float, default=240.0, help="tune-serving --budget-s")
    ap.add_argument(
        "--tune-slo-p99-ms", type=float, default=100.0, help="tune-serving --slo-p99-ms"
    )
    ap.add_argument(
        "--tune-no-source",
        action="store_true",
        help="tune-serving --no-source: the whole budget for the version (the source's search "
        "takes 35%% of it otherwise, for the capacity's 'saved %%')",
    )
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--markdown", type=Path, help="write the report as Markdown here")
    args = ap.parse_args()
    if not args.tune and any(a.startswith("--tune-") for a in sys.argv[1:]):
        ap.error("--tune-budget-s, --tune-slo-p99-ms and --tune-no-source need --tune")

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

    from mlflow import MlflowClient

    version = str(
        MlflowClient(settings.tracking_uri, settings.registry_uri)
        .get_model_version_by_alias(args.model, "champion")
        .version
    )
    tune = None
    if args.tune:  # before any server starts: they would share the cores, and read the tag
        tune = tune_version(
            env,
            args.model,
            version,
            logdir,
            slo_p99_ms=args.tune_slo_p99_ms,
            budget_s=args.tune_budget_s,
            source=not args.tune_no_source,
        )
        for line in _tuning_summary(tune):
            print(line, flush=True)

    if args.home is None:
        # The local Prefect server `bladeflow optimize` started for the bench's own home: idle
        # but not free on two shared cores, and not needed any more.
        down = [str(BIN / "python"), "-m", "bladeflow.app.cli", "down", "--home", str(home)]
        subprocess.run(down, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)

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
        nobatch = pinned_flags(ROOT, max_batch_size=1, batch_timeout_ms=0, workers=1)
        servers["bladeflow-nobatch"] = bladeflow_server(
            env, args.model, logdir, "nobatch", **nobatch
        )
    if want("bladeflow-batch"):
        servers["bladeflow-batch"] = bladeflow_server(
            env, args.model, logdir, "batch", **pinned_flags(ROOT, **batch_flags)
        )
    if tune is not None and tune["result"] is not None and want(TUNED):
        # No serving flags: any flag given would beat the tag's value for that key.
        servers[TUNED] = bladeflow_server(env, args.model, logdir, "tuned")
    if args.baseline_src and want("before-batch"):
        src = args.baseline_src.resolve()
        servers["before-batch"] = bladeflow_server(
            env, args.model, logdir, "before", src=src, **pinned_flags(src, **batch_flags)
        )
    sweep_servers = {
        c: bladeflow_server(
            env,
            args.model,
            logdir,
            "sweep-" + "-".join(map(str, c)),
            **pinned_flags(ROOT, max_batch_size=c[0], batch_timeout_ms=c[1], workers=c[2]),
        )
        for c in configs
    }
    procs = (
        [mlflow_proc] + [p for p, _ in servers.values()] + [p for p, _ in sweep_servers.values()]
    )
    try:
        for p in procs:
            p.wait_ready()
        served = {k: served_config(u, args.model) for k, (_, u) in servers.items()}
        for k, sc in served.items():
            print(f"{k} serves: {_config_line(sc)}", flush=True)
        problems = _config_problems(served, tune)
        for line in problems:
            print(f"WARNING: {line}", flush=True)
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
        comparisons = _comparisons(table, conc)
        targets_met = _issue17(table, tune)
        print("\n".join(["", *comparisons, "", "issue #17 targets:", *targets_met]), flush=True)
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
        sweep_m = {
            ":".join(map(str, cfg)): {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for cfg, rs in sweep.items()
        }
        for cfg, m in zip(sweep, sweep_m.values(), strict=True):
            print(f"{cfg[0]:>5} {cfg[1]:>10} {cfg[2]:>7} {_fmt(m)} {int(m['errors']):>6}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "model": args.model,
                        "version": version,
                        "main": {f"{k[0]}@{k[1]}": v for k, v in table.items()},
                        "sweep": sweep_m,
                        "served_config": served,
                        "config_problems": problems,
                        "comparisons": comparisons,
                        "issue17": targets_met,
                        "tune": tune,
                    },
                    indent=2,
                )
            )
        if args.markdown:
            report = {"served": served, "problems": problems, "comparisons": comparisons,
                      "issue17": targets_met, "sweep": sweep_m}  # fmt: skip
            args.markdown.write_text(_markdown(args, version, table, conc, report, tune))
    finally:
        for p in procs:
            p.stop()
    if tune is not None and tune["result"] is None:
        sys.exit(f"tune-serving failed (exit {tune['exit_code']}): see {tune['log']}")


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


def _comparisons(table: dict[tuple[str, int], dict[str, float]], conc: list[int]) -> list[str]:
    """Per concurrency: each bladeflow serve target against mlflow, raw ORT and the default."""
    lines = []
    for c in conc:
        for name in ("bladeflow-batch", TUNED, "before-batch"):
            b = table.get((name, c))
            if not b:
                continue
            parts = []
            m, raw = table.get(("mlflow-serve", c)), table.get(("raw-ort", c))
            default = table.get(("bladeflow-batch", c)) if name == TUNED else None
            if m:
                parts.append(
                    f"{name}/mlflow QPS x{b['qps'] / m['qps']:.2f}, "
                    f"p99 {b['p99_ms']:.0f} vs {m['p99_ms']:.0f} ms"
                )
            if raw:
                parts.append(f"{name}/raw-ort QPS {100 * b['qps'] / raw['qps']:.0f}%")
            if default:
                parts.append(
                    f"{name}/bladeflow-batch QPS x{b['qps'] / default['qps']:.2f}, "
                    f"p99 {b['p99_ms']:.0f} vs {default['p99_ms']:.0f} ms"
                )
            if parts:
                lines.append(f"c={c}: " + "; ".join(parts))
    return lines


def _issue17(
    table: dict[tuple[str, int], dict[str, float]], tune: dict[str, Any] | None, c: int = 32
) -> list[str]:
    """Issue #17's targets, one line each: met, NOT met, or n/a with why."""

    def line(ok: bool | None, text: str) -> str:
        return f"  [{'n/a' if ok is None else 'met' if ok else 'NOT met'}] {text}"

    if tune is None:
        return [line(None, "run with --tune: the targets are about the tuned configuration")]
    res = tune["result"]
    if res is None:
        return [line(False, f"tune-serving failed (exit {tune['exit_code']}, see {tune['log']})")]
    out = []
    gain, tuned_qps, default_qps = res.get("gain_vs_default"), res["tuned_qps"], res["default_qps"]
    out.append(
        line(
            None if gain is None else gain >= 1.3,
            f"tuned/default sustained rate at p99 <= {res['slo_p99_ms']:g} ms (tune-serving, "
            f"open loop): {tuned_qps:.1f} / {default_qps:.1f} QPS = x{gain} (want >= 1.3)",
        )
    )
    t, m, raw = table.get((TUNED, c)), table.get(("mlflow-serve", c)), table.get(("raw-ort", c))
    if t and m:
        ratio = t["qps"] / m["qps"]
        out.append(
            line(
                ratio >= 2.0 and t["p99_ms"] < m["p99_ms"],
                f"c={c}: {TUNED}/mlflow-serve QPS x{ratio:.2f} (want >= 2), p99 "
                f"{t['p99_ms']:.0f} vs {m['p99_ms']:.0f} ms (want lower)",
            )
        )
    else:
        out.append(line(None, f"c={c}: needs {TUNED} and mlflow-serve at concurrency {c}"))
    if t and raw:
        share = t["qps"] / raw["qps"]
        out.append(
            line(
                share >= 0.8,
                f"c={c}: {TUNED}/raw-ort QPS {100 * share:.0f}% (want >= 80%)",
            )
        )
    else:
        out.append(line(None, f"c={c}: needs {TUNED} and raw-ort at concurrency {c}"))
    out.append(
        line(
            tune["wall_s"] <= 300,
            f"tuning took {tune['wall_s']:.0f} s wall (tuner's own clock {res['seconds']:.0f} s, "
            f"budget {res['budget_s']:g} s; want <= 300 s)",
        )
    )
    return out


def _tuning_summary(tune: dict[str, Any]) -> list[str]:
    res = tune["result"]
    head = f"tune-serving: exit {tune['exit_code']}, {tune['wall_s']:.1f} s wall"
    if res is None:
        return [f"{head}; no result (see {tune['log']})"]
    lines = [
        f"{head} (tuner {res['seconds']:.1f} s), budget {res['budget_s']:g} s, "
        f"p99 SLO {res['slo_p99_ms']:g} ms, synthetic requests: {res['synthetic_requests']}"
    ]
    cfg = res.get("serving_config")
    if cfg is None:
        lines.append(f"no configuration recorded: {res.get('reason')}")
    else:
        keys = ("max_batch_size", "batch_timeout_ms", "max_queue_size", "workers",
                "intra_op_threads")  # fmt: skip
        lines.append("chosen (tag): " + " ".join(f"{k}={cfg.get(k)}" for k in keys))
    lines.append(
        f"sustained at the SLO: tuned {res['tuned_qps']:.1f} QPS vs default "
        f"{res['default_qps']:.1f} QPS: x{res.get('gain_vs_default')} (tune-serving's ratio)"
    )
    lines.append(f"configurations measured: {len(res.get('table', []))}")
    return lines


def _config_line(cfg: dict[str, Any] | None) -> str:
    if cfg is None:
        return "not reported (GET /v2/models/NAME has no serving_config)"
    doc = dict(cfg)
    origin = doc.pop("from", "?")
    return " ".join(f"{k}={v}" for k, v in doc.items()) + f" (from {origin})"


def _config_problems(
    served: dict[str, dict[str, Any] | None], tune: dict[str, Any] | None
) -> list[str]:
    """Targets that do not run what they stand for: the default target must run the defaults
    (from flags), the tuned one the tuner's choice (from the tag)."""
    problems = []

    def differs(cfg: dict[str, Any], want: dict[str, Any]) -> list[str]:
        return [f"{k}={cfg.get(k)} (want {v})" for k, v in want.items() if cfg.get(k) != v]

    batch = served.get("bladeflow-batch")
    if batch is not None and (bad := differs(batch, DEFAULT_SERVE)):
        problems.append("bladeflow-batch does not run the defaults: " + ", ".join(bad))
    tuned = served.get(TUNED)
    chosen = ((tune or {}).get("result") or {}).get("serving_config")
    if TUNED in served and chosen is not None:
        want = {k: chosen[k] for k in DEFAULT_SERVE if k in chosen}
        if tuned is None or tuned.get("from") != "tag" or differs(tuned, want):
            problems.append(f"{TUNED} does not run the tuned tag: {_config_line(tuned)}")
    elif TUNED in served:
        problems.append(f"{TUNED}: tune-serving recorded no configuration, so it runs defaults")
    return problems


def _markdown(
    args: argparse.Namespace,
    version: str,
    table: dict[tuple[str, int], dict[str, float]],
    conc: list[int],
    report: dict[str, Any],
    tune: dict[str, Any] | None,
) -> str:
    """The run as Markdown: served configurations, medians, comparisons, issue #17, tuning."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    md = [
        f"# Serving bench: {args.model} version {version}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cores} core(s), "
        f"{args.seconds:g} s per cell, {args.rounds} round(s) interleaved, medians.",
        "",
        "## Served configurations",
        "",
        "| target | configuration |",
        "|---|---|",
        *(f"| {k} | {_config_line(v)} |" for k, v in report["served"].items()),
        "",
        *(f"**Warning:** {p}" for p in report["problems"]),
        "## Closed loop, medians",
        "",
        "| target | concurrency | QPS | p50 ms | p99 ms | mean ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, c), r in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        md.append(
            f"| {name} | {c} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r.get('mean_ms', float('nan')):.1f} | {int(r['errors'])} |"
        )
    md += ["", *(f"- {x}" for x in report["comparisons"]), ""]
    md += ["## Issue #17 targets", "", *(f"- {x.strip()}" for x in report["issue17"]), ""]
    if report["sweep"]:
        md += [
            f"## Batching sweep at concurrency {args.sweep_concurrency}",
            "",
            "| batch:timeout_ms:workers | QPS | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|",
            *(
                f"| {k} | {m['qps']:.1f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                f"{int(m['errors'])} |"
                for k, m in report["sweep"].items()
            ),
            "",
        ]
    if tune is not None:
        md += ["## Tuning (`bladeflow tune-serving`)", "", f"`{tune['command']}`", ""]
        md += [f"- {x}" for x in _tuning_summary(tune)]
        res = tune["result"]
        if res is not None:
            from bladeflow.tasks.benchmark.serving_tune import (
                TuneResult,
                capacity_markdown,
                table_markdown,
            )

            result = TuneResult.model_validate(res)
            md += [
                "",
                "Chosen configuration (tag `bladeflow.serving_config`):",
                "",
                "```json",
                json.dumps(res.get("serving_config"), indent=2),
                "```",
                "",
                table_markdown(result),
                "",
                capacity_markdown(result),
            ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
