"""The HTTP app: Open Inference Protocol v2 routes on a lean Starlette app.

Request path of an infer call (see :mod:`bladeflow.serving.request_path`): read -> route
(champion, canary; shadow after the answer) -> decode -> batch -> run -> encode. Every route goes
through :func:`answer`, the one place where an exception becomes its HTTP answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bladeflow.serving import heap
from bladeflow.serving.endpoints import Call, Endpoints
from bladeflow.serving.errors import Unauthorized, as_serving_error, error_response
from bladeflow.serving.fleet import Fleet
from bladeflow.serving.metrics import Metrics

Handler = Callable[[Request], Awaitable[Response]]
Count = Callable[[Call, int], None]


class BearerAuth:
    """Checks ``Authorization: Bearer TOKEN`` in constant time."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the bearer token must not be empty; pass None for no token")
        # Compare digests: constant time, and equal lengths, so not even the length leaks.
        self._expected = hashlib.sha256(f"Bearer {token}".encode()).digest()

    def check(self, request: Request) -> None:
        """Raises Unauthorized unless the request carries the token."""
        given = hashlib.sha256(request.headers.get("authorization", "").encode()).digest()
        if not hmac.compare_digest(given, self._expected):
            raise Unauthorized


def answer(handler: Handler, auth: BearerAuth | None = None, count: Count | None = None) -> Handler:
    """Wrap a handler: check the token, turn what it raises into the v2 error answer, count it.

    Args:
        handler: Returns the 200 answer or raises.
        auth: Checked first, when the route is guarded.
        count: Called with every answer (any status) of a counted route (infer).
    """

    async def endpoint(request: Request) -> Response:
        call = Call(time.perf_counter())
        request.state.call = call
        try:
            if auth is not None:
                auth.check(request)
            response = await handler(request)
        except Exception as exc:  # noqa: BLE001 - every failure is answered; ours are logged
            response = error_response(as_serving_error(exc, call.model, call.version))
        if count is not None:
            count(call, response.status_code)
        return response

    return endpoint


def build_app(
    fleet: Fleet,
    metrics: Metrics,
    *,
    token: str | None = None,
    max_body_bytes: int = 8 << 20,
    freeze_heap: bool = False,
) -> Starlette:
    """The server's ASGI app over ``fleet``.

    Args:
        fleet: The served models.
        metrics: Where requests are counted.
        token: Require ``Authorization: Bearer TOKEN`` on every route but health and the docs.
        max_body_bytes: Largest infer request body (413 above).
        freeze_heap: Exempt the long-lived heap from garbage collection at start-up and after
            each version change (see :mod:`bladeflow.serving.heap`): the server process sets
            it; an app inside someone else's process (tests) leaves their collector alone.
    """
    api = Endpoints(fleet, metrics, max_body_bytes=max_body_bytes)
    auth = BearerAuth(token) if token else None

    def open_(handler: Handler) -> Handler:
        return answer(handler)

    def guarded(handler: Handler) -> Handler:
        return answer(handler, auth)

    infer = answer(api.infer, auth, api.count)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        keeper = None
        if freeze_heap:
            heap.freeze()  # everything is imported; nothing is loaded or served yet
        fleet.start()
        if freeze_heap:
            keeper = asyncio.get_running_loop().create_task(heap.keep_frozen(fleet))
        try:
            yield
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            await fleet.close()

    model = "/v2/models/{name}"
    version = model + "/versions/{version}"
    routes = [
        Route("/v2/health/live", open_(api.live), methods=["GET"]),
        Route("/v2/health/ready", open_(api.ready), methods=["GET"]),
        Route("/v2", guarded(api.server_metadata), methods=["GET"]),
        Route(model, guarded(api.model_metadata), methods=["GET"]),
        Route(model + "/ready", guarded(api.model_ready), methods=["GET"]),
        Route(version, guarded(api.model_metadata), methods=["GET"]),
        Route(version + "/ready", guarded(api.model_ready), methods=["GET"]),
        Route(model + "/infer", infer, methods=["POST"]),
        Route(version + "/infer", infer, methods=["POST"]),
        Route("/metrics", guarded(api.metrics_text), methods=["GET"]),
        Route("/openapi.json", open_(api.openapi), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
