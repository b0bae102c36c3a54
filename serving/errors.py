"""Serving errors and their HTTP answers: the ONE place an exception becomes a status code.

Each step of the request path raises what went wrong (a :class:`ServingError`, or an exception of
a lower layer such as :class:`~bladeflow.serving.codec.DecodeError`); :func:`as_serving_error`
maps it to the answer, and :func:`error_response` writes the v2 error object.
"""

from __future__ import annotations

import logging

import orjson
from starlette.responses import Response

from bladeflow.serving.batching import QueueFull
from bladeflow.serving.codec import DecodeError, EncodeError

log = logging.getLogger("bladeflow.serving")

JSON = "application/json"
# ONNX Runtime's exception types (matched by name: onnxruntime is not imported here) that mean
# "these inputs do not fit the model", i.e. the caller's fault.
ORT_BAD_INPUT = frozenset({"InvalidArgument", "RuntimeException"})


class ServingError(Exception):
    """An answer other than 200: the HTTP status, a message for the caller, optional headers."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadRequest(ServingError):
    """The request cannot be run on this model (HTTP 400)."""

    status = 400


class Unauthorized(ServingError):
    """No or a wrong bearer token (HTTP 401)."""

    status = 401

    def __init__(self, message: str = "missing or wrong bearer token"):
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class NotFound(ServingError):
    """No such model, or that version is not loaded (HTTP 404)."""

    status = 404


class TooLarge(ServingError):
    """The request body is over the limit (HTTP 413)."""

    status = 413


class Overloaded(ServingError):
    """The model's queue is full; retry later (HTTP 429)."""

    status = 429

    def __init__(self, message: str):
        super().__init__(message, {"Retry-After": "1"})


class NotReady(ServingError):
    """The model has no loaded version yet (HTTP 503)."""

    status = 503

    def __init__(self, message: str):
        super().__init__(message, {"Retry-After": "1"})


class Timeout(ServingError):
    """No answer within the request timeout (HTTP 504)."""

    status = 504


def as_serving_error(exc: BaseException, model: str = "", version: str = "") -> ServingError:
    """The answer for ``exc``, raised while serving ``model`` (``version`` once routed).

    Anything not known to be the caller's fault is our failure (or the model's): logged with its
    traceback, answered 500.
    """
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, DecodeError):
        return BadRequest(str(exc))
    if isinstance(exc, QueueFull):
        return Overloaded(f"the queue of {model!r} is full; retry later")
    if type(exc).__name__ in ORT_BAD_INPUT:
        return BadRequest(f"inference failed: {exc}")
    where = f"{model} version {version}" if version else (model or "a request")
    if isinstance(exc, EncodeError):
        log.error("the answer of %s cannot be encoded: %s", where, exc)
        return ServingError(f"the response cannot be encoded: {exc}")
    log.error("serving %s failed", where, exc_info=exc)
    return ServingError(f"inference failed: {exc}")


def error_body(message: str) -> bytes:
    """The v2 error object."""
    return orjson.dumps({"error": message})


def error_response(err: ServingError) -> Response:
    """The HTTP answer of ``err``: its status, the v2 error object, its headers."""
    return Response(
        error_body(err.message), status_code=err.status, media_type=JSON, headers=err.headers
    )
