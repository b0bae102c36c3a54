"""Generate latency of encoder-decoders: the ONNX decoder loop against PyTorch eager generate().

Every model generates a fixed number of new tokens (``min_new_tokens = max_new_tokens``), so all
do the same work whatever their outputs; same search settings and the same thread count on both
sides (ONNX Runtime without spinning, which would slow the interleaved PyTorch calls). Models run
in interleaved blocks of calls (A B A B ...) with a pause between blocks; p50/p90/p99 over every
call, and the median of each round so the speedup gets a paired interval
(:meth:`BenchmarkReport.speedup_ci`).

:func:`breakdown` then splits each model's generate() into encoder, first decoder step and
per-token time, and holds the per-token time against the decoder's weight bytes over the measured
memory bandwidth: decoding small batches reads every weight once per step, so that quotient is
the floor a step cannot beat (:class:`StepBreakdown`).
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
    """generate() over ``folder``'s graphs with the benchmark's threads: bladeflow's loop, or
    ONNX Runtime's BeamSearch op when the folder holds its ``search.onnx``."""
    gen = _generator(folder, session, settings)
    search = settings.search()
    return lambda feeds: gen.generate(feeds, **search)


def _config(session: SessionConfig, settings: GenerateBench) -> SessionConfig:
    threads = thread_count(settings)
    return session.model_copy(update={"intra_op_num_threads": threads, "allow_spinning": False})


def _generator(folder: str | Path, session: SessionConfig, settings: GenerateBench) -> Any:
    from bladeflow.core.generation import SPEC_FILE, Generator, Seq2SeqSpec
    from bladeflow.core.search_op import SEARCH_FILE, SearchOpGenerator

    config = _config(session, settings)
    root = Path(folder)
    if (root / SEARCH_FILE).is_file():
        return SearchOpGenerator(root / SEARCH_FILE, Seq2SeqSpec.load(root / SPEC_FILE), config)
    return Generator(root, config)


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


# -- where the time goes: encoder, first step, per token; the memory-bandwidth bound ------------


class StepBreakdown(BaseModel):
    """One model at one batch size: generate()'s time split into its parts (medians, ms).

    ``bound_ms`` is the decoder's weight bytes over the measured memory bandwidth: a decoder step
    at small batch reads every weight once, so no step whose weights come from memory can be
    faster than that. ``per_token_ms / bound_ms`` says how far from that limit the loop runs
    (near 1: bandwidth-bound; far above 1: compute or per-step overhead dominates). Weights that
    fit in the CPU caches (the tiny test models: 0.1-1.5 MB) are not read from memory, so such a
    decoder can come out below 1.
    """

    batch_size: int
    new_tokens: int
    encoder_ms: float
    first_step_ms: float
    per_token_ms: float
    decoder_weight_bytes: int
    bound_ms: float
    how: str = Field(description="measured directly, or derived from generate() timings")

    @property
    def bound_ratio(self) -> float:
        return self.per_token_ms / self.bound_ms if self.bound_ms > 0 else float("inf")


class GenerationBreakdown(BaseModel):
    """The breakdown of every timed model, and the bandwidth it is held against."""

    bandwidth_gb_s: float = Field(description="numpy copy bandwidth (read + write), one thread")
    models: dict[str, dict[int, StepBreakdown]] = Field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"generation.bandwidth_gb_s": self.bandwidth_gb_s}
        for label, per in self.models.items():
            for bs, b in per.items():
                key = f"generation.breakdown.{label}.b{bs}"
                out |= {
                    f"{key}.encoder_ms": b.encoder_ms,
                    f"{key}.first_step_ms": b.first_step_ms,
                    f"{key}.per_token_ms": b.per_token_ms,
                    f"{key}.bound_ms": b.bound_ms,
                }
        return out


def measure_bandwidth(megabytes: int = 128, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s: the best of ``repeats`` copies of an array larger than the
    caches, counting the bytes read and written. One thread (numpy's copy): a floor of what the
    cores together can draw, so the bound it gives errs on the high side."""
    import time

    src = np.ones(megabytes * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes of the initializers of an ONNX graph (its weights; external data counted by shape)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total


# Cross-attention key/value projections run once per request (their output is cached), not per
# step: BART/mBART/Marian/Pegasus/Whisper and T5 names.
_CROSS_KV = (
    "encoder_attn.k_proj.",
    "encoder_attn.v_proj.",
    "EncDecAttention.k.",
    "EncDecAttention.v.",
)


def torch_decoder_bytes(model: Any) -> int:
    """Bytes of the parameters one decoder step reads: the decoder and the LM head (a weight
    tied to the embeddings counts once), without the cross-attention key/value projections."""
    seen: dict[int, int] = {}
    head = model.get_output_embeddings()
    modules = [model.get_decoder(), *([head] if head is not None else [])]
    for module in modules:
        for name, p in module.named_parameters():
            if not any(part in name for part in _CROSS_KV):
                seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def _median_ms(values: list[float]) -> float:
    return 1e3 * float(np.median(values))


def onnx_breakdown(
    folder: str | Path,
    session: SessionConfig,
    feeds: dict[str, np.ndarray],
    settings: GenerateBench,
    bandwidth_gb_s: float,
) -> StepBreakdown:
    """bladeflow's loop on ``feeds``: encoder, first step and later steps timed directly (a
    folder with ONNX Runtime's search op: :func:`search_op_breakdown`)."""
    from bladeflow.core.generation import DECODER_FILE, Generator
    from bladeflow.core.search_op import SEARCH_FILE

    if (Path(folder) / SEARCH_FILE).is_file():
        return search_op_breakdown(folder, session, feeds, settings, bandwidth_gb_s)
    gen = Generator(folder, _config(session, settings))
    for _ in range(settings.warmup):
        gen.step_times(feeds, settings.new_tokens)
    enc, first, later = [], [], []
    for _ in range(settings.rounds):
        times = gen.step_times(feeds, settings.new_tokens)
        enc.append(times.encoder_s)
        first.append(times.steps_s[0])
        later += times.steps_s[1:]
    weights = onnx_weight_bytes(Path(folder) / DECODER_FILE)
    return StepBreakdown(
        batch_size=len(next(iter(feeds.values()))),
        new_tokens=settings.new_tokens,
        encoder_ms=_median_ms(enc),
        first_step_ms=_median_ms(first),
        per_token_ms=_median_ms(later) if later else _median_ms(first),
        decoder_weight_bytes=weights,
        bound_ms=weights / (bandwidth_gb_s * 1e9) * 1e3,
        how="measured per step",
    )


def search_op_breakdown(
    folder: str | Path,
    session: SessionConfig,
    feeds: dict[str, np.ndarray],
    settings: GenerateBench,
    bandwidth_gb_s: float,
) -> StepBreakdown:
    """ONNX Runtime's search op: the whole loop is one call, so the encoder is timed alone (its
    graph in its own session) and the steps are derived from op calls of 1 and N tokens."""
    from bladeflow.core.generation import DECODER_FILE, ENCODER_FILE
    from bladeflow.core.runtime import make_session

    op = _generator(folder, session, settings)
    encoder = make_session(Path(folder) / ENCODER_FILE, _config(session, settings))
    enc_feeds = {n: np.asarray(feeds[n], dtype=np.int64) for n in op.spec.encoder_inputs}
    search = {k: v for k, v in settings.search().items() if "new_tokens" not in k}
    return _derived_breakdown(
        lambda: encoder.run(None, enc_feeds),
        lambda n: op.generate(feeds, max_new_tokens=n, min_new_tokens=n, **search),
        feeds,
        settings,
        onnx_weight_bytes(Path(folder) / DECODER_FILE),
        bandwidth_gb_s,
        "derived from search-op calls of 1 and N tokens",
    )


def torch_breakdown(
    model: Any, feeds: dict[str, np.ndarray], settings: GenerateBench, bandwidth_gb_s: float
) -> StepBreakdown:
    """PyTorch eager: the encoder timed alone; the first step as generate(1 token) minus the
    encoder; per token as (generate(N) - generate(1)) / (N - 1). generate() gives no hook between
    steps, so these two are derived (they include generate()'s own per-step Python work)."""
    import torch

    from bladeflow.tasks.convert.seq2seq_export import source_generate

    torch.set_num_threads(thread_count(settings))
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    search = {k: v for k, v in settings.search().items() if "new_tokens" not in k}
    with torch.no_grad():
        return _derived_breakdown(
            lambda: model.get_encoder()(**inputs),
            lambda n: source_generate(
                model, inputs, use_cache=True, max_new_tokens=n, min_new_tokens=n, **search
            ),
            feeds,
            settings,
            torch_decoder_bytes(model),
            bandwidth_gb_s,
            "derived from generate() timings",
        )


def _derived_breakdown(
    encode: Callable[[], Any],
    generate: Callable[[int], Any],
    feeds: dict[str, np.ndarray],
    settings: GenerateBench,
    weights: int,
    bandwidth_gb_s: float,
    how: str,
) -> StepBreakdown:
    """Encoder timed alone; first step = generate(1) - encoder; per token = (generate(N) -
    generate(1)) / (N - 1); ``weights``: the decoder's bytes read per step."""

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    n = settings.new_tokens
    for _ in range(settings.warmup):
        generate(n)
    enc, one, full = [], [], []
    for _ in range(settings.rounds):
        enc.append(timed(encode))
        one.append(timed(lambda: generate(1)))
        full.append(timed(lambda: generate(n)))
    enc_ms, one_ms, full_ms = _median_ms(enc), _median_ms(one), _median_ms(full)
    first = max(0.0, one_ms - enc_ms)
    return StepBreakdown(
        batch_size=len(next(iter(feeds.values()))),
        new_tokens=n,
        encoder_ms=enc_ms,
        first_step_ms=first,
        per_token_ms=max(0.0, (full_ms - one_ms) / (n - 1)) if n > 1 else first,
        decoder_weight_bytes=weights,
        bound_ms=weights / (bandwidth_gb_s * 1e9) * 1e3,
        how=how,
    )


def breakdown(
    source_model: Any,
    candidates: Mapping[str, tuple[str | Path, SessionConfig]],
    batches: list[dict[str, np.ndarray]],
    batch_sizes: list[int],
    settings: GenerateBench,
    progress: Callable[[str], None] | None = None,
) -> GenerationBreakdown:
    """The breakdown of the source (``source_model``, may be None) and each candidate (folder,
    session) at each batch size, against one bandwidth measurement."""
    bandwidth = measure_bandwidth()
    if progress:
        progress(f"benchmark: breakdown (memory bandwidth {bandwidth:.1f} GB/s)")
    out = GenerationBreakdown(bandwidth_gb_s=bandwidth)
    for bs in batch_sizes:
        feeds = rows(batches, bs)
        if source_model is not None:
            out.models.setdefault(SOURCE, {})[bs] = torch_breakdown(
                source_model, feeds, settings, bandwidth
            )
        for label, (folder, session) in candidates.items():
            out.models.setdefault(label, {})[bs] = onnx_breakdown(
                folder, session, feeds, settings, bandwidth
            )
    return out


def breakdown_table(report: GenerationBreakdown) -> str:
    """The breakdown as a Markdown table."""
    lines = [
        f"Memory bandwidth (numpy copy, one thread): {report.bandwidth_gb_s:.1f} GB/s. "
        "bound = decoder weight bytes / bandwidth: the fastest a small-batch step can be.",
        "",
        "| model | batch | encoder ms | first step ms | per token ms | decoder MB | bound ms "
        "| per token / bound | how |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, per in report.models.items():
        for bs, b in sorted(per.items()):
            lines.append(
                f"| {label} | {bs} | {b.encoder_ms:.2f} | {b.first_step_ms:.2f} | "
                f"{b.per_token_ms:.3f} | {b.decoder_weight_bytes / 1e6:.2f} | {b.bound_ms:.4f} | "
                f"{b.bound_ratio:.1f}x | {b.how} |"
            )
    return "\n".join(lines) + "\n"
