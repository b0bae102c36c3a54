"""The stage contract: small typed objects that pass between the stages of a flow.

Stages hand each other paths, URIs and metrics -- never model bytes or session objects -- so every
result is cheap to pass through Prefect, easy to log to MLflow and printable as JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bladeflow.core.outcome import Status

Dim = int | str | None
"""One tensor dimension: a fixed size, a symbolic name (dynamic), or ``None`` (unknown)."""


class TensorSpec(BaseModel):
    """Name, element type and shape of one model input or output."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str = Field(description="numpy dtype name, e.g. 'float32', 'int64'")
    shape: list[Dim] = Field(description="fixed sizes as ints, dynamic dims as names or null")
    value_range: list[float] | None = Field(
        None, description="[low, high) of valid values when known, e.g. [0, vocab_size) for ids"
    )

    @property
    def dynamic_axes(self) -> list[int]:
        """Indices of the dimensions whose size is not fixed."""
        return [i for i, d in enumerate(self.shape) if not isinstance(d, int)]

    def describe(self) -> str:
        dims = "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class Signature(BaseModel):
    """The inputs and outputs of a model, in graph order."""

    model_config = ConfigDict(frozen=True)

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


class PassRecord(BaseModel):
    """One applied optimization step, with its fully resolved configuration."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class Provenance(BaseModel):
    """Where an artifact came from, precise enough to reproduce it."""

    source: str = Field(description="the path/URI the user gave")
    parent_sha256: str | None = None
    step: PassRecord | None = None
    tool_versions: dict[str, str] = Field(default_factory=dict)


class ModelArtifact(BaseModel):
    """A model file on disk plus everything a later stage needs to know about it."""

    path: str
    format: str = Field(description="'onnx' for every artifact after conversion")
    sha256: str
    size_bytes: int
    signature: Signature
    provenance: Provenance
    assets: dict[str, str] = Field(
        default_factory=dict, description="files kept with the model, e.g. {'tokenizer': dir}"
    )


class SessionConfig(BaseModel):
    """How ONNX Runtime runs a model. Part of the recipe; serving uses the same settings."""

    model_config = ConfigDict(frozen=True)

    graph_optimization_level: str = Field(
        "all", description="ORT load-time graph optimization: disable, basic, extended or all"
    )
    intra_op_num_threads: int = Field(0, description="0 lets ONNX Runtime choose")
    inter_op_num_threads: int = Field(0, description="0 lets ONNX Runtime choose")
    execution_mode: str = Field("sequential", description="sequential or parallel")
    allow_spinning: bool = Field(True, description="intra-op threads busy-wait between runs")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    provider_options: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="per provider, ONNX Runtime provider options (e.g. TensorRT profiles and "
        "engine cache); a relative value of an option ending in _path is taken relative to the "
        "model's folder, so the cache travels with the model",
    )


class Candidate(BaseModel):
    """An optimized model (or the unoptimized baseline) competing for selection."""

    name: str
    artifact: ModelArtifact
    session: SessionConfig = Field(default_factory=SessionConfig)
    recipe: list[PassRecord] = Field(default_factory=list)


class DataRef(BaseModel):
    """Validation data on disk (a ``.npz`` of arrays by input name), checked against the model."""

    path: str
    samples: int
    synthetic: bool = Field(description="true when generated from the signature")


class Tolerance(BaseModel):
    """Accuracy gate: a candidate passes when every output of every sample satisfies it.

    Elementwise ``|candidate - source| <= atol + rtol * |source|`` (numpy ``allclose``) and, per
    sample, cosine similarity to the source ``>= min_cosine``.
    """

    atol: float = Field(1e-4, ge=0, description="absolute error allowed per element")
    rtol: float = Field(1e-3, ge=0, description="error allowed relative to |source| per element")
    min_cosine: float = Field(0.999, ge=-1, le=1, description="lowest per-sample cosine allowed")


class OutputAccuracy(BaseModel):
    """How far one output of a candidate is from the source, over the whole dataset."""

    max_abs_error: float
    max_rel_error: float
    min_cosine: float
    mean_cosine: float
    samples: int
    failing_samples: int


class AccuracyReport(BaseModel):
    """Result of the accuracy gate for one candidate.

    ``status`` is OK (built and passed), FAILED (a pass, the gate or the benchmark rejected it:
    ``reason`` says which) or SKIPPED (not tried on this machine: ``reason`` says why).
    """

    candidate: str
    passed: bool
    outputs: dict[str, OutputAccuracy]
    reason: str = ""
    synthetic_data: bool = Field(description="true when inputs were generated from the signature")
    status: Status = Field(
        Status.OK, description="OK, FAILED or SKIPPED; derived from `passed` when not given"
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_status(cls, data: Any) -> Any:
        if isinstance(data, dict) and "status" not in data:
            data = {**data, "status": Status.OK if data.get("passed") else Status.FAILED}
        return data


class LatencyStats(BaseModel):
    """Latency distribution of one model at one batch size."""

    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float = Field(description="samples per second at this batch size (from p50)")
    iterations: int
    round_medians_ms: list[float] = Field(
        default_factory=list,
        description="median latency in each interleaved round, in round order: paired by round "
        "with the other models' for a speedup interval (bladeflow.core.stats)",
    )


class SourceBaseline(BaseModel):
    """What the benchmark's ``source`` latency (every speedup's denominator) ran.

    The source framework the way it is served: a traced graph for TensorFlow/Keras, PyTorch under
    ``inference_mode`` with the candidates' thread count. Where the framework also has an eager
    path that differs, it is timed too (label ``source-eager``) and ``source`` holds, at each batch
    size, the faster of the two.
    """

    source: str = Field(description="what ran as 'source' (the served path, unless refused)")
    eager: str = Field("", description="what ran as 'source-eager'; empty when not timed")
    eager_faster: list[int] = Field(
        default_factory=list,
        description="batch sizes where the eager path was faster, so 'source' holds its timing",
    )
    served_p50_ms: dict[int, float] = Field(
        default_factory=dict, description="p50 of the served path per batch size"
    )
    eager_p50_ms: dict[int, float] = Field(
        default_factory=dict, description="p50 of the eager path per batch size (when timed)"
    )
    threads: int | None = Field(None, description="intra-op threads asked of the framework")
    note: str = Field("", description="e.g. why the served path was not used")

    def text(self) -> str:
        """One line for the console, the report and the ``bladeflow.baseline`` tag."""
        parts = [self.source]
        if self.eager:
            ratios = ", ".join(
                f"{self.eager_p50_ms[b] / self.served_p50_ms[b]:.2f}x at batch {b}"
                for b in sorted(self.eager_p50_ms)
                if self.served_p50_ms.get(b)
            )
            parts.append(
                f"eager path ({self.eager}) timed as 'source-eager': its latency is {ratios} "
                "the served path's"
            )
        if self.eager_faster:
            parts.append(
                f"eager was faster at batch {', '.join(map(str, self.eager_faster))}: the "
                "baseline there is eager"
            )
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


class BenchmarkReport(BaseModel):
    """Latency per model (source and candidates) per batch size, measured in one interleaved run."""

    models: dict[str, dict[int, LatencyStats]]
    skipped_batch_sizes: dict[int, str] = Field(default_factory=dict)
    shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="input shapes at batch 1"
    )
    baseline: SourceBaseline | None = Field(
        None, description="what ran as 'source' (None: the ONNX graph in ONNX Runtime)"
    )
    planned_rounds: int | None = Field(
        None,
        description="set when the benchmark could add rounds until a decision was significant: "
        "the rounds planned before that, so every interval is judged at the sequential "
        "confidence (bladeflow.core.stats.sequential_confidence)",
    )

    def speedup_ci(self, new: str, old: str) -> dict[int, tuple[float, float]]:
        """Batch size -> 95% interval of ``old/new`` latency over the paired rounds.

        Only batch sizes with at least two paired rounds (a finite interval, so the JSON of
        ``OptimizeResult.speedup_ci`` round-trips); e.g. ``bench.speedup_ci(chosen, "source")``.
        """
        from bladeflow.core.stats import paired_speedup

        out: dict[int, tuple[float, float]] = {}
        for bs, mine in self.models.get(new, {}).items():
            base = self.models.get(old, {}).get(bs)
            a, b = mine.round_medians_ms, base.round_medians_ms if base else []
            if len(a) >= 2 and len(a) == len(b):
                sp = paired_speedup(a, b)
                # 4 significant digits: a tiny low end (few, noisy rounds) must not become 0
                out[bs] = (float(f"{sp.lo:.4g}"), float(f"{sp.hi:.4g}"))
        return out

    def slower_than(
        self, name: str, reference: str, margin: float = 0.10, skip: Sequence[int] = ()
    ) -> str | None:
        """Why ``name`` is significantly slower than ``reference`` at some batch size.

        None when it is not (or either was not measured). Used so that the chosen model is never
        slower than the unoptimized one at any batch size the run measured, not only at the
        objective's: e.g. int8 kernels that win at batch 1 can lose at batch 32. ``skip``: batch
        sizes not judged (the objective's, where the selection itself compares them).

        With per-round medians (every report the benchmark writes) the verdict is the paired
        interval's (``bladeflow.core.stats``, 95%): slower only when the whole interval is below
        1. ``margin`` is used only for reports without rounds (older runs): ratio > 1 + margin.
        """
        from bladeflow.core.stats import Verdict, paired_speedup

        mine, ref = self.models.get(name, {}), self.models.get(reference, {})
        worst: tuple[float, int, str] | None = None
        for bs, stats in mine.items():
            base = ref.get(bs)
            if bs in skip or base is None or base.p50_ms <= 0 or stats.p50_ms <= 0:
                continue
            rounds = len(stats.round_medians_ms)
            if rounds >= 2 and rounds == len(base.round_medians_ms):
                sp = paired_speedup(stats.round_medians_ms, base.round_medians_ms)
                if sp.verdict is Verdict.SLOWER and (worst is None or sp.estimate < worst[0]):
                    why = (
                        f"speed {sp.text()} relative to {reference!r} at batch {bs} "
                        f"(significantly slower at {sp.confidence:.0%})"
                    )
                    worst = (sp.estimate, bs, why)
                continue
            speed = base.p50_ms / stats.p50_ms
            if speed < 1.0 / (1.0 + margin) and (worst is None or speed < worst[0]):
                why = (
                    f"{1 / speed:.2f}x the p50 latency of {reference!r} at batch {bs} "
                    f"(more than {margin:.0%} slower)"
                )
                worst = (speed, bs, why)
        return None if worst is None else worst[2]


StageStatus = Status  # the one status vocabulary (bladeflow.core.outcome), under its old name


class StageResult(BaseModel):
    """What every stage reports: status, outputs, metrics, report files and time taken."""

    stage: str
    status: StageStatus
    elapsed_s: float
    outputs: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    reports: list[str] = Field(default_factory=list)
    reason: str = ""


class OptimizeResult(BaseModel):
    """What ``bladeflow optimize --json`` prints and the optimize flow returns."""

    name: str
    version: str
    model_uri: str
    run_id: str
    candidate: str
    recipe: list[PassRecord]
    session: SessionConfig
    accuracy: dict[str, OutputAccuracy]
    latency_ms: dict[str, dict[int, LatencyStats]] = Field(
        description="'source' and 'chosen' -> batch size -> latency stats"
    )
    throughput: dict[str, dict[int, float]]
    speedup: dict[int, float] = Field(
        description="batch size -> source/chosen latency: the paired estimate over the "
        "interleaved rounds (centre of speedup_ci), else source p50 / chosen p50"
    )
    speedup_ci: dict[int, tuple[float, float]] = Field(
        default_factory=dict,
        description="batch size -> 95% interval of source/chosen latency over paired rounds",
    )
    source_runtime: str = Field("", description="what ran the source in the benchmark")
    synthetic_data: bool
    stages: list[StageResult]
    outcome: Literal["registered", "not_improved"] = Field(
        "registered",
        description="not_improved: with must_beat, the chosen candidate was not faster than the "
        "incumbent by min_speedup, so nothing was registered (version and model_uri are empty)",
    )
    incumbent_version: str | None = Field(None, description="the version it had to beat")
    incumbent_speedup: float | None = Field(
        None, description="incumbent / chosen at the objective (same interleaved benchmark)"
    )
    incumbent_speedup_ci: tuple[float, float] | None = Field(
        None, description="95% interval of incumbent_speedup; registered only if low >= min"
    )
    baseline: str = Field(
        "",
        description="what the 'source' latency (the speedup's denominator) ran: the source "
        "framework as it is served (also the version tag bladeflow.baseline)",
    )
    source_eager_ms: dict[int, LatencyStats] = Field(
        default_factory=dict,
        description="batch size -> latency of the source framework's eager path, where it has "
        "one besides the served path (reported, not the baseline unless it was faster)",
    )
    speedup_vs_eager: dict[int, float] = Field(
        default_factory=dict, description="batch size -> eager p50 / chosen p50 (where timed)"
    )
    serving_config: dict[str, Any] | None = Field(
        None,
        description="with tune_serving: the configuration recorded as the version tag "
        "bladeflow.serving_config (None: not tuned, or no configuration held the SLO; see "
        "serving_tune_reason)",
    )
    capacity: dict[str, Any] | None = Field(
        None,
        description="with tune_serving: sustained QPS per core at the SLO, cores for the target "
        "rate and resources saved against the source (as `bladeflow tune-serving --json`)",
    )
    serving_tune_reason: str | None = Field(
        None, description="with tune_serving: why no serving configuration was recorded"
    )
