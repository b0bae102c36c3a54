"""Prometheus metrics of the server. The names are an interface: release gates read them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DIFF_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


class Metrics:
    """All server metrics in one registry of their own (several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "bladeflow_requests_total",
            "Inference requests by model, version, role (champion|canary|shadow) and HTTP status.",
            ["model", "version", "role", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "bladeflow_request_duration_seconds",
            "Time from request received to response ready.",
            ["model", "version", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "bladeflow_queue_depth", "Requests waiting for a batch.", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "bladeflow_batch_size",
            "Rows per batch run by ONNX Runtime.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "bladeflow_queue_wait_seconds",
            "Time a request waited from being queued until its batch left for ONNX Runtime "
            "(request duration minus this is decode, run and encode).",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "bladeflow_inference_duration_seconds",
            "Time of one ONNX Runtime run (one batch).",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "bladeflow_model_load_failures_total",
            "Model versions that failed to download, load or warm up.",
            ["model", "version"],
            registry=r,
        )
        self.shadow_comparisons = Counter(
            "bladeflow_shadow_comparisons_total",
            "Champion requests also run on the canary, by whether the outputs agreed.",
            ["model", "version", "agree"],
            registry=r,
        )
        self.shadow_max_abs_diff = Histogram(
            "bladeflow_shadow_max_abs_diff",
            "Largest absolute difference between canary (shadow) and champion outputs.",
            ["model", "version"],
            buckets=DIFF_BUCKETS,
            registry=r,
        )
        self.registry_up = Gauge(
            "bladeflow_registry_up",
            "1 when the last registry poll succeeded, 0 when it failed (loaded versions keep "
            "serving either way).",
            registry=r,
        )
        self.registry_poll_failures = Counter(
            "bladeflow_registry_poll_failures_total",
            "Registry polls that failed (unreachable, refused, timed out).",
            registry=r,
        )
        self.model_info = Gauge(
            "bladeflow_model_info",
            "1 for each loaded model version and its role.",
            ["model", "version", "role"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
