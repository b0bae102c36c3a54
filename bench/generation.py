"""Encoder-decoder generation: PyTorch eager ``generate()`` vs bladeflow's ONNX Runtime loop.

Run: ``.venv/bin/python -m bench.generation [--model bart|whisper] [--threads 2] [--rounds 5]``.
A BART-type (text) or Whisper-type (log-mel-like features) model is built from a config and
trained briefly on a synthetic task (tests/generation/tiny_models), exported with
tasks/convert/seq2seq_export, then timed at batch 1 and 8 with a fixed number of new tokens
(min = max), greedy. Variants run in interleaved blocks of calls (A B C A B C ...), medians over
rounds; torch and ONNX Runtime use the same thread count, ORT without spinning.

For text models a fourth variant runs ONNX Runtime's contrib ``BeamSearch`` op (com.microsoft,
``num_beams=1``) wrapping the same two graphs (tasks/optimize/search_op.py): the whole loop in
C++, one ``session.run`` per generate().

A second table breaks generate() down (tasks/benchmark/generation.py): encoder, first decoder
step and per-token time, against the decoder's weight bytes over the measured memory bandwidth
(``bound``: the fastest a small-batch decoder step can be).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from bladeflow.core.contract import SessionConfig
from bladeflow.core.generation import Generator
from bladeflow.core.search_op import SEARCH_FILE, SearchOpGenerator
from bladeflow.tasks.benchmark import generation as gb
from bladeflow.tasks.convert.seq2seq_export import export, same_tokens, source_generate
from bladeflow.tasks.optimize.search_op import build_search_model
from tests.generation import tiny_models as tm

Run = Callable[[dict[str, np.ndarray], int], np.ndarray]


def _block(run: Run, inputs: dict[str, np.ndarray], new: int, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run(inputs, new)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("bart", "whisper"), default="bart")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=32, help="batch-1 inputs for exact match")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the initial weights: the same model every run
    speech = args.model == "whisper"
    if speech:
        arch = tm.tiny_whisper(d_model=args.d_model, layers=args.layers, max_target_positions=128)
    else:
        arch = tm.tiny_bart(d_model=args.d_model, layers=args.layers, max_positions=128)
    model = tm.train(arch, speech=speech, steps=args.train_steps)
    rng = np.random.default_rng(11)

    def batch_of(seqs: list[list[int]]) -> dict[str, np.ndarray]:
        return tm.speech_batch(seqs, rng) if speech else tm.text_batch(seqs)

    folder = tempfile.mkdtemp(prefix="bench-seq2seq-")
    atexit.register(shutil.rmtree, folder, True)
    export(model, folder)
    config = SessionConfig(intra_op_num_threads=args.threads, allow_spinning=False)
    plain, bound = Generator(folder, config), Generator(folder, config, io_binding=True)

    def eager(inputs: dict[str, np.ndarray], new: int) -> np.ndarray:
        feeds = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.no_grad():
            out = source_generate(
                model, feeds, max_new_tokens=new, min_new_tokens=new, use_cache=True
            )
        result: np.ndarray = out.numpy()
        return result

    variants: dict[str, Run] = {
        "torch eager": eager,
        "bladeflow ORT": lambda x, n: plain.generate(x, max_new_tokens=n, min_new_tokens=n),
        "bladeflow ORT+IOBinding": lambda x, n: bound.generate(
            x, max_new_tokens=n, min_new_tokens=n
        ),
    }
    op_folder = None
    if not speech:
        op_folder = tempfile.mkdtemp(prefix="bench-search-op-")
        atexit.register(shutil.rmtree, op_folder, True)
        shutil.copytree(folder, op_folder, dirs_exist_ok=True)
        build_search_model(op_folder, f"{op_folder}/{SEARCH_FILE}")
        op = SearchOpGenerator(f"{op_folder}/{SEARCH_FILE}", plain.spec, config)
        variants["ORT BeamSearch op"] = lambda x, n: op.generate(
            x, max_new_tokens=n, min_new_tokens=n
        )
    kind = "Whisper-type" if speech else "BART-type"
    print(
        f"{kind} d_model={args.d_model} layers={args.layers}, threads={args.threads}, "
        f"rounds={args.rounds} (shared machine: compare ratios within this run only)"
    )
    parts: list[tuple[int, int, gb.GenerationBreakdown]] = []
    bandwidth = gb.measure_bandwidth()
    header = f"{'batch':>5} {'new':>4} {'variant':<24} {'ms/call':>9} {'ms/token':>9} "
    print(header + f"{'vs eager':>9} {'exact':>7}")
    for batch in (1, 8):
        for new in (16, 64):
            inputs = batch_of(tm.random_sequences(rng, batch))
            calls = max(1, 4 // batch)
            for run in variants.values():  # warm-up
                run(inputs, new)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, run in variants.items():
                    times[name].append(_block(run, inputs, new, calls))
                    time.sleep(0.05)  # let spinning/cached threads settle between blocks
            samples = tm.random_sequences(rng, args.samples if batch == 1 else 4 * batch)
            match = _exact_rate(
                variants,
                [batch_of(samples[i : i + batch]) for i in range(0, len(samples), batch)],
                new,
            )
            base = statistics.median(times["torch eager"])
            for name in variants:
                med = statistics.median(times[name])
                rate = "" if name == "torch eager" else f"{100 * match[name]:.0f}%"
                print(
                    f"{batch:>5} {new:>4} {name:<24} {1e3 * med:>9.2f} "
                    f"{1e3 * med / new:>9.3f} {base / med:>8.2f}x {rate:>7}"
                )
            settings = gb.GenerateBench(
                new_tokens=new, rounds=args.rounds, warmup=1, threads=args.threads
            )
            report = gb.GenerationBreakdown(bandwidth_gb_s=bandwidth)
            report.models["torch eager"] = {
                batch: gb.torch_breakdown(model, inputs, settings, bandwidth)
            }
            report.models["bladeflow ORT"] = {
                batch: gb.onnx_breakdown(folder, config, inputs, settings, bandwidth)
            }
            if op_folder is not None:
                report.models["ORT BeamSearch op"] = {
                    batch: gb.onnx_breakdown(op_folder, config, inputs, settings, bandwidth)
                }
            parts.append((batch, new, report))
    print()
    print(f"breakdown (memory bandwidth, numpy copy on one thread: {bandwidth:.1f} GB/s)")
    print(
        f"{'batch':>5} {'new':>4} {'variant':<24} {'encoder':>8} {'1st step':>8} "
        f"{'ms/token':>9} {'bound ms':>9} {'x bound':>8}"
    )
    for batch, new, report in parts:
        for name, per in report.models.items():
            b = per[batch]
            print(
                f"{batch:>5} {new:>4} {name:<24} {b.encoder_ms:>8.2f} {b.first_step_ms:>8.2f} "
                f"{b.per_token_ms:>9.3f} {b.bound_ms:>9.4f} {b.bound_ratio:>7.1f}x"
            )


def _exact_rate(
    variants: dict[str, Run], batches: list[dict[str, np.ndarray]], new: int
) -> dict[str, float]:
    """Per variant, the share of samples whose tokens equal torch eager's exactly."""
    hits = {name: 0 for name in variants}
    total = 0
    for inputs in batches:
        ref = variants["torch eager"](inputs, new)
        total += len(ref)
        for name, run in variants.items():
            out = run(inputs, new)
            hits[name] += sum(same_tokens(out[j], ref[j], tm.EOS) for j in range(len(ref)))
    return {name: n / total for name, n in hits.items()}


if __name__ == "__main__":
    main()
