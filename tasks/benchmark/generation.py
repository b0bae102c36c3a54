"""Generate latency of encoder-decoders: the ONNX decoder loop against PyTorch eager generate().

Every model generates a fixed number of new tokens (``min_new_tokens = max_new_tokens``), so all
do the same work whatever their outputs; same search settings and the same thread count on both
sides (ONNX Runtime without spinning, which would slow the interleaved PyTorch calls). Models run
in interleaved blocks of calls (A B A B ...) with a pause between blocks; p50/p90/p99 over every
call, and the median of each round so the speedup gets a paired interval
(:meth:`BenchmarkReport.speedup_ci`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from bladeflow.core.contract import BenchmarkReport, LatencyStats, SessionConfig

Run = Callable[[dict[str, np.ndarray]], Any]
SOURCE = "source"


class GenerateBench(BaseModel):
    """How long and with what settings generate() is timed."""

    new_tokens: int = Field(32, ge=1, description="tokens generated per call (min = max)")
    num_beams: int = Field(1, ge=1)
    length_penalty: float = 1.0
    rounds: int = Field(5, ge=2)
    iterations: int = Field(4, ge=1, description="calls per model per round")
    warmup: int = Field(1, ge=0)
    threads: int = Field(0, ge=0, description="0: PyTorch's default thread count, for both")
    pause_s: float = Field(0.02, ge=0)

    def search(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.new_tokens,
            "min_new_tokens": self.new_tokens,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
        }


def thread_count(settings: GenerateBench) -> int:
    import torch

    return settings.threads or int(torch.get_num_threads())


def onnx_runner(folder: str | Path, session: SessionConfig, settings: GenerateBench) -> Run:
    """generate() of bladeflow's loop over ``folder``'s graphs, with the benchmark's threads."""
    from bladeflow.core.generation import Generator

    threads = thread_count(settings)
    config = session.model_copy(update={"intra_op_num_threads": threads, "allow_spinning": False})
    gen = Generator(folder, config)
    search = settings.search()
    return lambda feeds: gen.generate(feeds, **search)


def torch_runner(model: Any, settings: GenerateBench) -> Run:
    """PyTorch eager ``generate(use_cache=True)`` with the same search and thread count."""
    import torch

    from bladeflow.tasks.convert.seq2seq_export import source_generate

    torch.set_num_threads(thread_count(settings))
    search = settings.search()

    def run(feeds: dict[str, np.ndarray]) -> Any:
        inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            return source_generate(model, inputs, use_cache=True, **search)

    return run


def rows(batches: list[dict[str, np.ndarray]], count: int) -> dict[str, np.ndarray]:
    """``count`` rows of the data (cycled when there are fewer), padding only what they need."""
    flat: list[dict[str, np.ndarray]] = []
    for feeds in batches:
        n = len(next(iter(feeds.values())))
        flat += [{k: v[i] for k, v in feeds.items()} for i in range(n)]
    picked = [flat[i % len(flat)] for i in range(count)]
    out: dict[str, np.ndarray] = {}
    if "attention_mask" in picked[0]:
        width = max(int(p["attention_mask"].sum()) for p in picked)
        for name in picked[0]:
            out[name] = np.stack([p[name][:width] for p in picked])
        return out
    return {name: np.stack([p[name] for p in picked]) for name in picked[0]}


def bench_generate(
    runs: Mapping[str, Run],
    batches: list[dict[str, np.ndarray]],
    batch_sizes: list[int],
    settings: GenerateBench,
    progress: Callable[[str], None] | None = None,
) -> BenchmarkReport:
    """Time each runner at each batch size in interleaved rounds."""
    models: dict[str, dict[int, LatencyStats]] = {label: {} for label in runs}
    shapes: dict[str, list[int]] = {}
    for bs in batch_sizes:
        feeds = rows(batches, bs)
        if bs == 1:
            shapes = {k: list(v.shape) for k, v in feeds.items()}
        if progress:
            progress(f"benchmark: generate {settings.new_tokens} tokens at batch {bs}")
        for run in runs.values():
            for _ in range(settings.warmup):
                run(feeds)
        calls: dict[str, list[float]] = {label: [] for label in runs}
        medians: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(settings.rounds):
            for label, run in runs.items():
                block = []
                for _ in range(settings.iterations):
                    start = time.perf_counter()
                    run(feeds)
                    block.append(1e3 * (time.perf_counter() - start))
                calls[label] += block
                medians[label].append(float(np.median(block)))
                time.sleep(settings.pause_s)
        for label, ms in calls.items():
            p50, p90, p99 = np.percentile(ms, [50, 90, 99])
            models[label][bs] = LatencyStats(
                batch_size=bs,
                p50_ms=float(p50),
                p90_ms=float(p90),
                p99_ms=float(p99),
                mean_ms=float(np.mean(ms)),
                throughput=bs * 1e3 / float(p50),
                iterations=len(ms),
                round_medians_ms=medians[label],
            )
    return BenchmarkReport(models=models, shapes=shapes)
