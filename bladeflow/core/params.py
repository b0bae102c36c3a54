"""Parameter models of the flows: one place for what the CLI, the Prefect UI form and the nightly
re-runs pass in. Each is a pydantic model, so the Prefect UI renders it as a form.

Flow parameters are stored by Prefect and shown in its UI, so none of them may carry a password:
``tracking_uri`` refuses one (the CLI moves it into ``MLFLOW_TRACKING_USERNAME/PASSWORD``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, field_validator

from bladeflow.core import registry
from bladeflow.core.budget import AccuracyBudget, OutputFacts, parse_budget
from bladeflow.core.contract import BenchmarkReport, LatencyStats, Tolerance
from bladeflow.core.errors import UserInputError
from bladeflow.core.policy import TolerancePolicy, policy_from_tolerance
from bladeflow.core.redact import redact, split_credentials
from bladeflow.core.release_plan import ReleasePlan


def no_password(uri: str | None) -> str | None:
    """``uri`` if it carries no password; the validator every flow's ``tracking_uri`` uses."""
    if uri and split_credentials(uri)[2] is not None:
        raise ValueError(
            f"tracking_uri {redact(uri)!r} carries a password; pass the plain URI and set "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment instead"
        )
    return uri


# The two checks every flow's parameters share, as types: a field annotated with one runs it.
# check_model_name raises UserInputError (not ValueError), so pydantic lets it through unwrapped:
# the CLI and the flows report the same one-paragraph message as before.
ModelName = Annotated[str, AfterValidator(registry.check_model_name)]
TrackingUri = Annotated[str | None, AfterValidator(no_password)]


class Objective(BaseModel):
    """What the selection optimizes: p50 latency or throughput at one batch size."""

    kind: str = Field(description="latency or throughput")
    batch: int = Field(ge=1)

    @classmethod
    def parse(cls, objective: str) -> Objective:
        """``latency@1`` -> latency at batch 1; ``throughput@32`` -> throughput at batch 32."""
        kind, _, batch = objective.partition("@")
        if kind not in {"latency", "throughput"} or not batch.isdigit() or int(batch) < 1:
            raise UserInputError(
                f"objective {objective!r} is not valid: use latency@BATCH or throughput@BATCH, "
                "e.g. latency@1"
            )
        return cls(kind=kind, batch=int(batch))

    def stats(self, bench: BenchmarkReport, label: str) -> LatencyStats:
        """``label``'s stats at the objective's batch size (its smallest measured one if absent)."""
        per = bench.models[label]
        return per.get(self.batch) or per[min(per)]

    def speedup(self, bench: BenchmarkReport, new: str, old: str) -> float:
        """How many times better ``new`` is than ``old`` on this objective (>1: better)."""
        a, b = self.stats(bench, new), self.stats(bench, old)
        if self.kind == "latency":
            return b.p50_ms / a.p50_ms if a.p50_ms else 0.0
        return a.throughput / b.throughput if b.throughput else 0.0


class BenchParams(BaseModel):
    """How long the benchmark measures each model at each batch size."""

    warmup: int = Field(5, ge=0, description="untimed runs before measuring")
    rounds: int = Field(5, ge=1, description="interleaved rounds over all models")
    iterations: int = Field(20, ge=1, description="timed runs per model per round")
    max_seconds: float = Field(10.0, gt=0, description="time cap per model and batch size")
    extra_seconds: float = Field(
        0.0,
        ge=0,
        description="when a timing decision (must_beat) is still undecided after `rounds`, add "
        "rounds for up to this many seconds before deciding",
    )
    max_rounds: int = Field(50, ge=1, description="rounds at most, extra rounds included")


class ServingTune(BaseModel):
    """How the serving tuner searches: the SLO, its time budget and the capacity target.

    ``bladeflow tune-serving`` takes these as flags; the optimize and nightly flows as their
    ``tune`` field, used when ``tune_serving`` is on.
    """

    slo_p99_ms: float = Field(100.0, gt=0, description="p99 latency a sustained rate must keep")
    # 40: the least in which the search measures one configuration (a server start-up and 15 s
    # of steps, tasks/benchmark/serving_search.py) with room for its time checks; 30 measured none.
    budget_s: float = Field(300.0, ge=40, description="time for the whole search, source included")
    target_qps: float = Field(1000.0, gt=0, description="rate the capacity numbers plan for")
    source: bool = Field(True, description="also tune the unoptimized source, for 'saved %'")


class OptimizeParams(BaseModel):
    """Parameters of the optimize flow (the Prefect UI renders them as a form)."""

    source: str = Field(description="model file/folder/URI to optimize")
    name: ModelName = Field(description="registered model name in MLflow")
    data: str | None = Field(
        None,
        description="validation data: .npz / folder of .npy (arrays by input name), or "
        ".parquet/.csv/.jsonl (columns = inputs, or text columns for a tokenizer)",
    )
    labels_column: str | None = Field(None, description="column with labels, for task metrics")
    text_columns: list[str] | None = Field(None, description="text column(s) to tokenize")
    calibration: str | None = Field(None, description="separate calibration data (int8 static)")
    min_rows: int = Field(1, ge=1, description="fewest validation samples accepted")
    format: str | None = Field(None, description="source format; detected from the path if unset")
    signature: str | None = Field(None, description="TensorFlow serving signature to export")
    weights: str | None = Field(
        None, description="Caffe: the .caffemodel beside a .prototxt (default: same stem)"
    )
    keep_initializer_inputs: bool = Field(
        False, description="ONNX: keep initializers listed as graph inputs (to feed weights)"
    )
    input_shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="input -> example/fixed shape, e.g. x: [1, 3, 224, 224]"
    )
    dynamic_axes: dict[str, dict[int, str]] | None = Field(
        None, description="input/output -> axis -> dim name; default: batch (and sequence)"
    )
    target_opset: int | None = Field(None, description="ONNX opset to export or upgrade to")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    preset: str = Field("cpu", description="which candidate recipes to try")
    passes: str | None = Field(None, description="explicit recipes, e.g. 'ort_graph:level=all'")
    objective: str = Field("latency@1", description="latency@BATCH or throughput@BATCH")
    recovery_budget_s: float = Field(
        300.0, ge=0, description="time budget of accuracy recovery (mixed precision) per recipe"
    )
    accuracy: str | None = Field(
        None,
        description="accuracy budget, e.g. 'cosine>=0.99' (embeddings), "
        "'argmax>=0.995,prob_drift<=0.02' (classifiers), 'similarity:abs<=0.02', "
        "'decision>=0.99@0.5', 'metric_drop<=0.005' (labels), 'auto'. Unset: 'auto' (the default "
        "for each output's kind) unless `tolerance` or `policy` is given",
    )
    tolerance: Tolerance = Field(
        default_factory=Tolerance,
        description="elementwise gate (atol/rtol/min_cosine); given explicitly, it replaces the "
        "default budget",
    )
    policy: TolerancePolicy | None = Field(
        None,
        description="full gate policy (presets, per-output overrides, task metric limit); "
        "overrides `accuracy` and `tolerance`",
    )
    bench: BenchParams = Field(default_factory=BenchParams)
    benchmark_work_pool: str | None = Field(
        None,
        description="run the benchmark on this Prefect work pool (its workers sit on the target "
        "hardware, e.g. a GPU pool) through the benchmark-on-POOL deployment",
    )
    benchmark_timeout_s: float = Field(
        3600.0, gt=0, description="with benchmark_work_pool: how long to wait for its worker"
    )
    must_beat: str | None = Field(
        None,
        description="register only if faster than this version of the same model (a number or "
        "an alias, e.g. 'champion'), timed in the same interleaved benchmark",
    )
    min_speedup: float = Field(
        1.0, gt=0, description="with must_beat: incumbent/chosen at the objective, at least"
    )
    tune_serving: bool = Field(
        False,
        description="after registering, tune `bladeflow serve` for the new version (the "
        "bladeflow.serving_config tag and the capacity numbers); a failed tune leaves the version "
        "registered and the result says why",
    )
    tune: ServingTune = Field(
        default_factory=ServingTune, description="with tune_serving: the SLO, budget and target"
    )
    tracking_uri: TrackingUri = Field(None, description="MLflow tracking URI override")

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive integers, e.g. [1, 8, 32]")
        return sorted(set(v))

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        Objective.parse(v)
        return v

    @field_validator("accuracy")
    @classmethod
    def _accuracy(cls, v: str | None) -> str | None:
        return None if v is None else parse_budget(v).text()

    def accuracy_budget(self) -> AccuracyBudget | None:
        """The budget the gate uses, or None when ``policy`` or an explicit ``tolerance`` does.

        ``accuracy`` when given; else, unless ``policy`` or ``tolerance`` was given, ``auto``.
        """
        if self.policy is not None:
            return None
        if self.accuracy is not None:
            return parse_budget(self.accuracy)
        if "tolerance" in self.model_fields_set:
            return None
        return AccuracyBudget()

    def effective_policy(self, outputs: dict[str, OutputFacts] | None = None) -> TolerancePolicy:
        """The gate policy: ``policy`` when given, else the budget's on a model with ``outputs``
        (what each output is; without them, its general limits), else ``tolerance``'s."""
        budget = self.accuracy_budget()
        if budget is not None:
            return budget.to_policy(outputs)
        return self.policy or policy_from_tolerance(self.tolerance)


class NightlyParams(BaseModel):
    """Parameters of the nightly re-optimization (a form in the Prefect UI)."""

    min_speedup: float = Field(
        1.05,
        gt=0,
        description="keep a new version only if current/new latency (or new/current throughput) "
        "at the objective batch size is at least this",
    )
    models: list[str] | None = Field(None, description="only these opted-in models (default all)")
    force: bool = Field(False, description="re-optimize even when nothing changed")
    bench: BenchParams | None = Field(None, description="benchmark length (default: recorded)")
    release: bool = Field(
        False, description="start the release deployment for each kept version (when registered)"
    )
    release_deployment: str = Field("release/release", description="flow/deployment to start")
    # On by default: nightly runs unattended on otherwise idle cores, and a version it keeps may be
    # released right away (`release`); untuned, it would serve with the flags' defaults, not with
    # a configuration measured for it. It costs `tune.budget_s` per registered version only.
    tune_serving: bool = Field(
        True,
        description="tune `bladeflow serve` for each version the run registers, before any "
        "release (bladeflow.serving_config tag, capacity); a failed tune keeps the version",
    )
    tune: ServingTune = Field(
        default_factory=ServingTune, description="with tune_serving: the SLO, budget and target"
    )
    tracking_uri: TrackingUri = Field(None, description="MLflow tracking URI override")


def default_endpoints() -> list[str]:
    """Serving base URLs a release scrapes: ``BLADEFLOW_SERVING_URLS`` (comma-separated)."""
    import os

    raw = os.environ.get("BLADEFLOW_SERVING_URLS", "http://127.0.0.1:8080")
    return [u.strip() for u in raw.split(",") if u.strip()]


class ReleaseParams(BaseModel):
    """Parameters of the release flow (the Prefect UI renders them as a form)."""

    name: ModelName = Field(description="registered model name")
    version: str = Field(description="version to release (must be tagged bladeflow.validated)")
    plan: ReleasePlan = Field(default_factory=ReleasePlan)
    approval: bool = Field(False, description="pause for approval in the UI before the last stage")
    endpoints: list[str] = Field(
        default_factory=default_endpoints, description="serving base URLs (each has /metrics)"
    )
    actor: str | None = Field(
        None, description="who triggered it [default: $BLADEFLOW_ACTOR/$USER]"
    )
    tracking_uri: TrackingUri = Field(None, description="MLflow tracking URI override")

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        if not v or any(not u.startswith(("http://", "https://")) for u in v):
            raise ValueError("endpoints must be one or more http(s):// base URLs of serving")
        return v


class TuneParams(ServingTune):
    """Parameters of the serving tuner (``bladeflow tune-serving``, the tune task of the flows)."""

    name: ModelName = Field(description="registered model name")
    version: str = Field(description="version number or alias to tune")
    tracking_uri: TrackingUri = Field(None, description="MLflow tracking URI override")
