"""The HTTP app: Open Inference Protocol v2 routes on a lean Starlette app.

Request path: read body -> pick role -> decode -> batch (submit) -> await outputs -> encode.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bladeflow.serving.batching import QueueFull
from bladeflow.serving.codec import (
    DecodeError,
    InferRequest,
    decode_request,
    encode_response,
    error_body,
)
from bladeflow.serving.fleet import Fleet, ModelSlot, Runner
from bladeflow.serving.metrics import Metrics
from bladeflow.serving.openapi import OPENAPI
from bladeflow.serving.routing import CANARY, CHAMPION, SHADOW, choose_role, compare

log = logging.getLogger("bladeflow.serving")

JSON = "application/json"
ROUTING_HEADER = "x-routing-key"
Handler = Callable[[Request], Awaitable[Response]]


class _TooLarge(Exception):
    pass


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON, headers=headers)


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type=JSON, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (HTTP 413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    fleet: Fleet,
    metrics: Metrics,
    *,
    token: str | None = None,
    max_body_bytes: int = 8 << 20,
) -> Starlette:
    """The server's ASGI app over ``fleet``."""
    options = fleet.options
    # Compare digests: constant time, and equal lengths, so not even the length leaks.
    expected = hashlib.sha256(f"Bearer {token}".encode()).digest() if token else None
    rng = random.Random()

    def guarded(handler: Handler) -> Handler:
        if expected is None:
            return handler

        async def check(request: Request) -> Response:
            given = hashlib.sha256(request.headers.get("authorization", "").encode()).digest()
            if not hmac.compare_digest(given, expected):
                return _error("missing or wrong bearer token", 401, {"WWW-Authenticate": "Bearer"})
            return await handler(request)

        return check

    def slot_of(request: Request) -> ModelSlot | None:
        return fleet.slots.get(request.path_params["name"])

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok = fleet.ready
        return _json({"ready": ok}, 200 if ok else 503)

    async def model_ready(request: Request) -> Response:
        slot = slot_of(request)
        if slot is None:
            return _error(f"unknown model {request.path_params['name']!r}", 404)
        return _json({"name": slot.name, "ready": slot.ready}, 200 if slot.ready else 503)

    async def model_metadata(request: Request) -> Response:
        slot = slot_of(request)
        if slot is None:
            return _error(f"unknown model {request.path_params['name']!r}", 404)
        dep = slot.deployment
        runners = dep.runners()
        doc: dict[str, Any] = {
            "name": slot.name,
            "versions": [r.version for r in runners.values()],
            "platform": "onnxruntime_onnx",
            "bladeflow": slot.status(),
        }
        wanted = request.path_params.get("version")
        chosen = next((r for r in runners.values() if r.version == wanted), dep.champion)
        if wanted is not None and (chosen is None or chosen.version != wanted):
            return _error(f"version {wanted} of {slot.name!r} is not loaded", 404)
        if chosen is not None:
            doc.update(chosen.model.describe())
            doc["tokenizer"] = chosen.model.tokenizer_dir is not None
        return _json(doc)

    async def infer(request: Request) -> Response:
        slot = slot_of(request)
        if slot is None:
            return _error(f"unknown model {request.path_params['name']!r}", 404)
        slot.in_flight += 1
        try:
            return await _infer(request, slot)
        finally:
            slot.in_flight -= 1

    async def _infer(request: Request, slot: ModelSlot) -> Response:
        start = time.perf_counter()
        try:
            body = await read_body(request, max_body_bytes)
        except _TooLarge:
            return _error(f"request body larger than {max_body_bytes} bytes", 413)
        # No await between choosing the runner and submitting: a swap cannot retire it between.
        dep = slot.deployment
        wanted = request.path_params.get("version")
        runner: Runner | None
        if wanted is not None:
            role, runner = next(
                ((k, r) for k, r in dep.runners().items() if r.version == wanted), ("", None)
            )
            if runner is None:
                loaded = [r.version for r in dep.runners().values()]
                return _error(
                    f"version {wanted} of {slot.name!r} is not served (loaded: {loaded})", 404
                )
        else:
            role = choose_role(
                dep.weight if dep.canary else 0, request.headers.get(ROUTING_HEADER), rng
            )
            runner = dep.canary if role == CANARY else dep.champion
        if runner is None:
            return _error(f"model {slot.name!r} is not loaded yet", 503, {"Retry-After": "1"})
        version = runner.version
        if slot.queue.depth >= slot.queue.limit:  # shed load before paying for decoding
            return _count(slot.name, version, role, start, _queue_full(slot.name))
        try:
            req = decode_request(
                body, runner.model.inputs, allow_text=runner.model.tokenizer_dir is not None
            )
            if req.texts is not None:
                req.inputs = runner.model.tokenize(req.texts)
            future = runner.batcher.submit(req.inputs)
        except DecodeError as exc:
            return _count(slot.name, version, role, start, _error(str(exc), 400))
        except QueueFull:
            return _count(slot.name, version, role, start, _queue_full(slot.name))
        try:
            outputs = await asyncio.wait_for(future, options.request_timeout_s)
        except TimeoutError:
            return _count(
                slot.name,
                version,
                role,
                start,
                _error(f"no answer within {options.request_timeout_s} s", 504),
            )
        except Exception as exc:  # noqa: BLE001 - reported to the caller (and logged if ours)
            bad_input = type(exc).__name__ in {"InvalidArgument", "RuntimeException"}
            if not bad_input:
                log.error("inference on %s version %s failed: %s", slot.name, version, exc)
            status = 400 if bad_input else 500
            return _count(
                slot.name, version, role, start, _error(f"inference failed: {exc}", status)
            )
        payload = encode_response(slot.name, version, outputs, req.request_id, req.outputs)
        # Mirror share: the --shadow floor, or the release's registry tag when it asks for more.
        wanted = slot.wanted.shadow_share / 100 if slot.wanted else 0.0
        share = max(options.shadow_share, wanted)
        if role == CHAMPION and dep.canary is not None and share and rng.random() < share:
            _shadow(slot, req, outputs)
        return _count(slot.name, version, role, start, Response(payload, media_type=JSON))

    def _queue_full(name: str) -> Response:
        return _error(f"the queue of {name!r} is full; retry later", 429, {"Retry-After": "1"})

    def _count(model: str, version: str, role: str, start: float, response: Response) -> Response:
        metrics.requests.labels(model, version, role, str(response.status_code)).inc()
        metrics.request_duration.labels(model, version, role).observe(time.perf_counter() - start)
        return response

    shadow_tasks: set[asyncio.Task[None]] = set()

    def _shadow(slot: ModelSlot, req: InferRequest, reference: dict[str, Any]) -> None:
        canary = slot.deployment.canary
        if canary is None:
            return
        try:
            future = canary.batcher.submit(req.inputs)
        except (QueueFull, RuntimeError):
            return  # shadow traffic never competes for a full queue
        task = asyncio.get_running_loop().create_task(
            _compare(slot.name, canary, future, reference)
        )
        shadow_tasks.add(task)
        task.add_done_callback(shadow_tasks.discard)

    async def _compare(name: str, canary: Runner, future: Any, reference: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            outputs = await asyncio.wait_for(future, options.request_timeout_s)
        except Exception:  # noqa: BLE001 - a failing shadow is counted, never seen by the caller
            metrics.requests.labels(name, canary.version, SHADOW, "500").inc()
            return
        metrics.requests.labels(name, canary.version, SHADOW, "200").inc()
        metrics.request_duration.labels(name, canary.version, SHADOW).observe(
            time.perf_counter() - start
        )
        agree, diff = compare(reference, outputs, options.shadow_atol, options.shadow_rtol)
        metrics.shadow_comparisons.labels(name, canary.version, "true" if agree else "false").inc()
        if diff != float("inf"):
            metrics.shadow_max_abs_diff.labels(name, canary.version).observe(diff)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return _json(OPENAPI)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fleet.start()
        try:
            yield
        finally:
            await fleet.close()

    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", guarded(server_metadata), methods=["GET"]),
        Route("/v2/models/{name}", guarded(model_metadata), methods=["GET"]),
        Route("/v2/models/{name}/ready", guarded(model_ready), methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", guarded(model_metadata), methods=["GET"]),
        Route("/v2/models/{name}/infer", guarded(infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", guarded(infer), methods=["POST"]),
        Route("/metrics", guarded(metrics_endpoint), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def server_metadata(request: Request) -> Response:
    return _json({"name": "bladeflow", "version": _version(), "extensions": []})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bladeflow")
    except PackageNotFoundError:
        return "0"
