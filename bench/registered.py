"""A registered MiniLM version timed outside bladeflow vs PyTorch eager, ORT fp32 and the peer.

Run::

    .venv/bin/python -m bench.registered --home DIR --name NAME --version V
    .venv/bin/python -m bench.registered --tracking-uri sqlite:///DIR/mlflow.db \\
        --name NAME --version V

The registered model is downloaded from MLflow (``models:/NAME/V``) and run by ONNX Runtime with the
session config of its ``bladeflow.recipe`` tag (the last entry; the logged
``bladeflow_runtime.json`` for versions without the tag), built by serving's own loader
(``bladeflow.serving.model.LoadedVersion`` -> ``bladeflow.core.runtime.make_session``).
``--as-served`` instead takes the config ``bladeflow serve`` would run (intra-op spinning off).

In the same process, as ``bench/minilm.py`` builds them: PyTorch eager (the sentence-transformers
mean-pooled, L2-normalized embedder under ``inference_mode``), ONNX Runtime fp32 on the plain
export (all graph optimizations, default session), and the accuracy-blind peer int8 recipe (ORT's
transformer optimizer O2 + per-tensor dynamic int8). All four are timed in interleaved blocks
(A B C D, then D C B A, ... several calls per block, a pause between blocks so one variant's
spinning threads do not slow the next), p50 per block, medians over rounds, on real sentences
(``bench/texts.py``): batch 1, 8 and 32 short sentences, and batch 32 x 128 tokens. The registered
model's embedding is its ``last_hidden_state`` mean-pooled over the attention mask and
L2-normalized in numpy (timed with it), or its 2-D output when it has no 3-D one.

Accuracy: min cosine of the registered model's embeddings vs PyTorch eager on 300 real short
sentences and 32 texts of 128 tokens. Targets of issue #15: >= 6x eager at batch 1 short (>= 5x
for a version optimized without ``--accuracy``), >= the peer on every row, >= 1.3x ORT fp32 at
32 x 128, cosine >= 0.99. Writes ``bench/results/registered-<name>-v<V>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.minilm import (
    Runner,
    cosines,
    encode,
    export,
    fp32_matmuls,
    interleaved,
    load_torch,
    ort_runner,
    peer_recipe,
    predict_all,
    torch_runner,
)
from bench.texts import long_texts, short_sentences

RESULTS = Path(__file__).parent / "results"
GATE_COSINE = 0.99
EAGER_TARGET = 6.0  # x eager at batch 1 short, with --accuracy cosine>=0.99
EAGER_TARGET_PLAIN = 5.0  # the same, for a plain `bladeflow optimize` (default budget)
FP32_TARGET = 1.3  # x ORT fp32 at batch 32 x 128 tokens
ACCURACY_SHORT, ACCURACY_LONG = 300, 32  # sentences / 128-token texts the cosine is taken on
# (texts, batch, calls per block): each block stays well under a second for the fast variants.
ROWS = (("short", 1, 20), ("short", 8, 10), ("short", 32, 4), ("128tok", 32, 2))
REGISTERED, EAGER, FP32, PEER = "registered", "pytorch-eager", "ort-fp32", "peer-o2-avx2-int8"


@dataclass
class RegisteredVersion:
    """A downloaded registered version, loaded the way serving loads it."""

    name: str
    version: str
    folder: Path
    model_file: Path
    session_config: Any  # bladeflow.core.contract.SessionConfig
    config_source: str  # where the session config came from
    tags: dict[str, str] = field(default_factory=dict)
    loaded: Any = None  # bladeflow.serving.model.LoadedVersion

    @property
    def recipe(self) -> list[dict[str, Any]]:
        from bladeflow.core import registry

        value = self.tags.get(registry.TAG_RECIPE)
        return list(json.loads(value)) if value else []

    @property
    def optimize_accuracy(self) -> str | None:
        """The ``--accuracy`` the version was optimized with ("" for none; None if unknown)."""
        from bladeflow.core import registry

        try:
            params = json.loads(self.tags.get(registry.TAG_OPTIMIZE_PARAMS, ""))
        except json.JSONDecodeError:  # absent or cut at the tag's length limit
            return None
        return str(params.get("accuracy") or "") if isinstance(params, dict) else None


def uris(home: str | None, tracking_uri: str | None) -> tuple[str, str]:
    """(tracking URI, registry URI) as bladeflow resolves ``--home`` / ``--tracking-uri``."""
    from bladeflow.core.settings import Settings

    settings = Settings.from_env(home=home).with_tracking_uri(tracking_uri)
    return settings.tracking_uri, settings.registry_uri


def load_registered(
    name: str,
    version: str,
    tracking_uri: str,
    registry_uri: str,
    workdir: Path,
    as_served: bool = False,
) -> RegisteredVersion:
    """Download ``models:/name/version`` into ``workdir`` and build its ONNX Runtime session.

    The session config is the recipe's (``bladeflow.recipe`` tag, else the logged runtime file);
    with ``as_served`` it is what ``bladeflow serve`` runs (``serving.model.session_config``). The
    session itself is built by serving's ``LoadedVersion`` (``core.runtime.make_session``).
    Only reads the registry.
    """
    import mlflow
    import mlflow.artifacts
    from mlflow import MlflowClient

    from bladeflow.core import registry
    from bladeflow.serving.model import (
        LoadedVersion,
        ServeOptions,
        _model_file,
        runtime_file_config,
        session_config,
    )

    client = MlflowClient(tracking_uri, registry_uri)
    mv = client.get_model_version(name, version)
    folder = workdir / f"{name}-v{version}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # models:/ URIs resolve through the process-wide registry URI.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(folder)
    )
    tags = dict(mv.tags)
    fallback = runtime_file_config(folder)
    if as_served:
        config = session_config(tags, ServeOptions(), fallback)
        source = "bladeflow serve (recipe config, intra-op spinning off)"
    elif registry.TAG_RECIPE in tags:
        config = registry.session_from_recipe(tags[registry.TAG_RECIPE])
        source = f"tag {registry.TAG_RECIPE} (last entry)"
    else:
        from bladeflow.core.contract import SessionConfig

        config = fallback or SessionConfig()
        source = registry.RUNTIME_FILE if fallback else "ONNX Runtime defaults (no recipe)"
    loaded = LoadedVersion(name, str(version), folder, config)
    return RegisteredVersion(
        name=name,
        version=str(version),
        folder=folder,
        model_file=_model_file(folder),
        session_config=config,
        config_source=source,
        tags=tags,
        loaded=loaded,
    )


def embedding_runner(loaded: Any) -> Runner:
    """Texts' model inputs -> sentence embeddings from a loaded version.

    A 3-D output (``last_hidden_state``) is mean-pooled over ``attention_mask`` and
    L2-normalized, as sentence-transformers does; otherwise the first 2-D output is the embedding.
    """
    shapes = loaded.output_shapes
    hidden = next((n for n in loaded.output_names if len(shapes[n]) == 3), None)
    flat = next((n for n in loaded.output_names if len(shapes[n]) == 2), None)
    if hidden is None and flat is None:
        raise ValueError(f"no 2-D or 3-D output among {loaded.output_names}: not an embedder")

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {
            k: v.astype(loaded.inputs[k].dtype) for k, v in feeds.items() if k in loaded.inputs
        }
        values = loaded.session.run([hidden or flat], inputs)[0]
        if hidden is None:
            return np.asarray(values)
        mask = feeds["attention_mask"][..., None].astype(values.dtype)
        pooled = (values * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)

    return run


def hidden_state_cosines(
    embedder: Any, loaded: Any, data: dict[str, np.ndarray], batch: int = 32
) -> float | None:
    """Min over samples of the cosine between the registered model's ``last_hidden_state`` and
    eager's, over each sample's real tokens (what bladeflow's gate judges, on real sentences).
    None when the version has no ``last_hidden_state`` output."""
    import torch

    if "last_hidden_state" not in loaded.output_names:
        return None
    worst = 1.0
    for i in range(0, len(data["input_ids"]), batch):
        feeds = {k: v[i : i + batch] for k, v in data.items()}
        with torch.inference_mode():
            want = embedder.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        want = want.last_hidden_state.numpy()
        inputs = {k: v for k, v in feeds.items() if k in loaded.inputs}
        got = loaded.session.run(["last_hidden_state"], inputs)[0]
        for row, mask in enumerate(feeds["attention_mask"].astype(bool)):
            a, b = got[row][mask].ravel(), want[row][mask].ravel()
            worst = min(worst, float(cosines(a[None], b[None])[0]))
    return worst


def timed_rows(
    runners: dict[str, Runner], tok: Any, sentences: list[str], rounds: int
) -> list[dict[str, Any]]:
    """Per row: p50 ms of each runner (median of per-block medians) and the registered model's
    speedups, each the median (and range) of the per-round ratios."""
    rows = []
    for kind, batch, iters in ROWS:
        if kind == "short":
            count = max(1, min(8, len(sentences) // batch))
            feeds = [encode(tok, sentences[i * batch : (i + 1) * batch]) for i in range(count)]
        else:
            feeds = [encode(tok, long_texts(sentences[i:], batch), length=128) for i in (0, 7)]
        per_round: list[dict[str, float]] = []
        for r in range(rounds):
            names = list(runners) if r % 2 == 0 else list(reversed(runners))
            shift = r % len(feeds)
            block = interleaved(
                {n: runners[n] for n in names}, feeds[shift:] + feeds[:shift], 1, iters
            )
            per_round.append(block)
        p50 = {n: statistics.median(b[n] for b in per_round) for n in runners}
        row: dict[str, Any] = {"texts": kind, "batch": batch, "calls_per_block": iters}
        row["p50_ms"] = p50
        row["tokens"] = int(feeds[0]["input_ids"].shape[1])
        for other in (EAGER, FP32, PEER):
            ratios = [b[other] / b[REGISTERED] for b in per_round]
            row[f"vs_{other}"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
        rows.append(row)
        print(
            f"  {kind} b{batch}: "
            + ", ".join(f"{n} {v:.2f} ms" for n, v in p50.items())
            + f"  (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    return rows


def targets(
    rows: list[dict[str, Any]], accuracy: dict[str, dict[str, float]], eager_target: float
) -> list[dict[str, Any]]:
    """Each target of issue #15: what was measured and whether it is met."""
    out = []
    b1 = next(r for r in rows if r["texts"] == "short" and r["batch"] == 1)
    out.append(
        {
            "target": f">= {eager_target:g}x PyTorch eager at batch 1 short",
            "measured": b1[f"vs_{EAGER}"]["median"],
            "met": b1[f"vs_{EAGER}"]["median"] >= eager_target,
        }
    )
    for r in rows:
        out.append(
            {
                "target": f">= peer int8 at {r['texts']} batch {r['batch']}",
                "measured": r[f"vs_{PEER}"]["median"],
                "met": r[f"vs_{PEER}"]["median"] >= 1.0,
            }
        )
    long = next(r for r in rows if r["texts"] == "128tok")
    out.append(
        {
            "target": f">= {FP32_TARGET:g}x ORT fp32 at batch 32 x 128 tokens",
            "measured": long[f"vs_{FP32}"]["median"],
            "met": long[f"vs_{FP32}"]["median"] >= FP32_TARGET,
        }
    )
    for kind, value in accuracy[REGISTERED].items():
        out.append(
            {
                "target": f"min cosine vs eager >= {GATE_COSINE} ({kind})",
                "measured": value,
                "met": value >= GATE_COSINE,
            }
        )
    return out


def markdown(rows: list[dict[str, Any]], kept: dict[str, tuple[int, int]]) -> str:
    fp32, total = kept[REGISTERED]
    lines = [
        "| texts | batch | eager ms | ORT fp32 ms | peer int8 ms | registered ms | x eager "
        "| x ORT fp32 | x peer | fp32 MatMuls kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["p50_ms"]

        def ratio(other: str, row: dict[str, Any] = r) -> str:
            v = row[f"vs_{other}"]
            return f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"

        lines.append(
            f"| {r['texts']} ({r['tokens']} tok) | {r['batch']} | {p[EAGER]:.2f} | {p[FP32]:.2f} "
            f"| {p[PEER]:.2f} | {p[REGISTERED]:.2f} | {ratio(EAGER)} | {ratio(FP32)} "
            f"| {ratio(PEER)} | {fp32}/{total} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="bladeflow home (its mlflow.db); also BLADEFLOW_HOME")
    parser.add_argument("--tracking-uri", help="MLflow tracking + registry URI instead of --home")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--version", required=True, help="model version")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per row")
    parser.add_argument("--workdir", default=".bladeflow/bench-registered")
    parser.add_argument(
        "--as-served", action="store_true", help="bladeflow serve's session (spinning off)"
    )
    parser.add_argument(
        "--eager-target",
        type=float,
        help=f"x eager at batch 1 short (default {EAGER_TARGET:g}, {EAGER_TARGET_PLAIN:g} for a "
        "version optimized without --accuracy)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from bladeflow.core.contract import SessionConfig
    from bladeflow.core.environment import hardware, tool_versions
    from bladeflow.tasks.convert.onnx_source import load_onnx_source
    from bladeflow.tasks.optimize.recipes import build_candidate

    started = time.time()
    load_start = os.getloadavg()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    tracking, registry_uri = uris(args.home, args.tracking_uri)
    reg = load_registered(args.name, args.version, tracking, registry_uri, work, args.as_served)
    log(
        f"{args.name} v{reg.version}: {reg.model_file.name}, candidate "
        f"{reg.tags.get('bladeflow.candidate')!r}, session {reg.session_config.model_dump()} "
        f"from {reg.config_source}"
    )

    tok, embedder = load_torch()
    onnx_path = work / "minilm.onnx"
    if not onnx_path.exists():
        export(embedder, tok, onnx_path)
    source = load_onnx_source(onnx_path, work / "converted")
    peer = build_candidate(peer_recipe(quantize=True), source, work / "candidates")
    runners: dict[str, Runner] = {
        EAGER: torch_runner(embedder),
        FP32: ort_runner(str(onnx_path), SessionConfig()),
        PEER: ort_runner(peer.artifact.path, peer.session),
        REGISTERED: embedding_runner(reg.loaded),
    }
    kept = {
        FP32: fp32_matmuls(onnx_path),
        PEER: fp32_matmuls(peer.artifact.path),
        REGISTERED: fp32_matmuls(reg.model_file),
    }
    log(f"built eager, ORT fp32, peer; fp32 MatMuls kept: {kept}")

    sentences = short_sentences(ACCURACY_SHORT)
    sets = {
        "short": encode(tok, sentences),
        "128tok": encode(tok, long_texts(sentences, ACCURACY_LONG), length=128),
    }
    reference = {k: predict_all(runners[EAGER], v) for k, v in sets.items()}
    accuracy = {
        name: {k: float(cosines(predict_all(run, v), reference[k]).min()) for k, v in sets.items()}
        for name, run in runners.items()
        if name != EAGER
    }
    log(f"min cosine vs eager ({ACCURACY_SHORT} short, {ACCURACY_LONG} x 128 tok): {accuracy}")
    hidden = {k: hidden_state_cosines(embedder, reg.loaded, v) for k, v in sets.items()}
    log(f"registered last_hidden_state, min cosine vs eager over real tokens: {hidden}")

    log(f"timing, {args.rounds} interleaved rounds per row (load {os.getloadavg()[0]:.1f})")
    rows = timed_rows(runners, tok, sentences, args.rounds)
    load_end = os.getloadavg()

    plain = reg.optimize_accuracy == ""
    eager_target = args.eager_target or (EAGER_TARGET_PLAIN if plain else EAGER_TARGET)
    verdicts = targets(rows, accuracy, eager_target)
    table = markdown(rows, kept)
    print()
    print(
        f"{args.name} v{reg.version} ({reg.tags.get('bladeflow.candidate')}), session "
        f"from {reg.config_source}; p50 ms, medians of {args.rounds} interleaved rounds; "
        "speedups: median [min-max] of the per-round ratios"
    )
    print(
        f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
        f"at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} "
        f"({os.cpu_count()} CPUs; a shared machine: absolute times are noisy)"
    )
    print(table)
    print()
    print(
        f"| variant | min cosine short ({ACCURACY_SHORT}) | min cosine 128 tok ({ACCURACY_LONG}) |"
    )
    print("|---|---:|---:|")
    for name, acc in accuracy.items():
        print(f"| {name} | {acc['short']:.5f} | {acc['128tok']:.5f} |")
    if hidden["short"] is not None:
        print(
            f"| registered last_hidden_state (real tokens; what the gate judges) "
            f"| {hidden['short']:.5f} | {hidden['128tok']:.5f} |"
        )
    print()
    for v in verdicts:
        print(f"- {'MET ' if v['met'] else 'MISSED'}  {v['target']}: {v['measured']:.4f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"registered-{args.name}-v{reg.version}.json"
    out.write_text(
        json.dumps(
            {
                "name": args.name,
                "version": reg.version,
                "tracking_uri": tracking,
                "candidate": reg.tags.get("bladeflow.candidate"),
                "optimize_accuracy": reg.optimize_accuracy,
                "recipe": reg.recipe,
                "session": reg.session_config.model_dump(mode="json"),
                "session_from": reg.config_source,
                "fp32_matmuls_kept": {k: list(v) for k, v in kept.items()},
                "accuracy_min_cosine_vs_eager": accuracy,
                "registered_last_hidden_state_min_cosine_vs_eager": hidden,
                "rows": rows,
                "targets": verdicts,
                "all_met": all(v["met"] for v in verdicts),
                "rounds": args.rounds,
                "load_average": {"start": load_start, "end": load_end},
                "hardware": hardware(),
                "tools": tool_versions(),
                "python": platform.python_version(),
                "elapsed_s": round(time.time() - started, 1),
            },
            indent=2,
            default=str,
        )
    )
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
