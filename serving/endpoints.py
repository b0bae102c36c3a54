"""The handlers of the Open Inference Protocol (v2) routes.

Handlers return the 200 answer or raise; :func:`bladeflow.serving.app.answer` turns what they
raise into the HTTP answer (one place) and counts infer answers, whatever their status.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from bladeflow.serving import request_path as step
from bladeflow.serving.errors import JSON, NotFound
from bladeflow.serving.fleet import Fleet, ModelSlot
from bladeflow.serving.metrics import Metrics
from bladeflow.serving.openapi import OPENAPI
from bladeflow.serving.shadow import Shadow

ROUTING_HEADER = "x-routing-key"
PLATFORM = "onnxruntime_onnx"


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON)


@dataclass
class Call:
    """What the metrics label one infer answer with; filled in as the request is routed.

    Labels stay empty until known, so a request for a model that is not served adds no series.
    """

    start: float
    model: str = ""
    version: str = ""
    role: str = ""


class Endpoints:
    """The route handlers over one fleet."""

    def __init__(self, fleet: Fleet, metrics: Metrics, *, max_body_bytes: int):
        self.fleet = fleet
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.rng = random.Random()
        self.shadow = Shadow(metrics, fleet.options, self.rng)

    def slot(self, request: Request) -> ModelSlot:
        name = request.path_params["name"]
        slot = self.fleet.slots.get(name)
        if slot is None:
            raise NotFound(f"unknown model {name!r}")
        return slot

    # Health and metadata

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        ok = self.fleet.ready
        return json_response({"ready": ok}, 200 if ok else 503)

    async def server_metadata(self, request: Request) -> Response:
        return json_response({"name": "bladeflow", "version": _version(), "extensions": []})

    async def model_ready(self, request: Request) -> Response:
        """``/ready`` of the model (its champion), or of one version when the path names it."""
        slot = self.slot(request)
        version = request.path_params.get("version")
        if version is not None:
            step.route(slot, version, None, self.rng)  # NotFound unless that version is loaded
            return json_response({"name": slot.name, "ready": True})
        return json_response({"name": slot.name, "ready": slot.ready}, 200 if slot.ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        slot = self.slot(request)
        dep = slot.deployment
        doc: dict[str, Any] = {
            "name": slot.name,
            "versions": [r.version for r in dep.runners().values()],
            "platform": PLATFORM,
            "bladeflow": slot.status(),
        }
        wanted = request.path_params.get("version")
        chosen = dep.champion
        if wanted is not None:
            chosen = step.route(slot, wanted, None, self.rng).runner
        if chosen is not None:
            doc.update(chosen.model.describe())
            doc["tokenizer"] = chosen.model.tokenizer_dir is not None
        return json_response(doc)

    # Inference

    async def infer(self, request: Request) -> Response:
        """POST .../infer: read -> route -> decode -> batch -> run -> encode (-> shadow)."""
        call: Call = request.state.call
        slot = self.slot(request)
        call.model = slot.name
        slot.in_flight += 1
        try:
            body = await step.read_body(request, self.max_body_bytes)
            # No await between choosing the runner and submitting: a swap cannot retire it between.
            chosen = step.route(
                slot,
                request.path_params.get("version"),
                request.headers.get(ROUTING_HEADER),
                self.rng,
            )
            call.role, call.version = chosen.role, chosen.version
            step.shed(slot)
            req = step.decode(body, chosen.runner.model)
            future = step.batch(chosen.runner, req)
            outputs = await step.run(future, self.fleet.options.request_timeout_s)
            response = step.encode(slot.name, chosen.version, outputs, req)
            self.shadow.mirror(slot, chosen.role, req, outputs)
            return response
        finally:
            slot.in_flight -= 1

    def count(self, call: Call, status: int) -> None:
        """Record one infer answer (any status) in the request counter and latency histogram."""
        m = self.metrics
        m.requests.labels(call.model, call.version, call.role, str(status)).inc()
        m.request_duration.labels(call.model, call.version, call.role).observe(
            time.perf_counter() - call.start
        )

    # Operations

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return json_response(OPENAPI)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bladeflow")
    except PackageNotFoundError:
        return "0"
