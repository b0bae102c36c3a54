"""The steps of one infer request, one function each: read, route, decode, batch, run, encode.

Every step raises what went wrong (see :mod:`bladeflow.serving.errors`); none writes an HTTP
answer or a metric, so each can be tested alone and the handler reads top to bottom.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from bladeflow.serving.batching import Outputs, QueueFull
from bladeflow.serving.codec import InferRequest, check_outputs, decode_request, encode_response
from bladeflow.serving.errors import JSON, BadRequest, NotFound, NotReady, Timeout, TooLarge
from bladeflow.serving.fleet import ModelSlot, Runner
from bladeflow.serving.model import LoadedVersion
from bladeflow.serving.routing import CANARY, choose_role

# Triton's binary tensor extension: the JSON header's length, binary tensors after it.
BINARY_HEADER = "inference-header-content-length"


@dataclass(frozen=True)
class Choice:
    """The runner that answers a request, and the role it answers in (champion or canary)."""

    role: str
    runner: Runner

    @property
    def version(self) -> str:
        return self.runner.version


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (declared or streamed).

    Raises:
        TooLarge: the body is over ``limit``.
        BadRequest: the body uses the binary tensor extension (not advertised).
    """
    if BINARY_HEADER in request.headers:
        raise BadRequest(
            "binary tensor data is not supported; send the values as JSON in 'data' "
            "(tritonclient: set_data_from_numpy(..., binary_data=False))"
        )
    too_large = TooLarge(f"request body larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def route(
    slot: ModelSlot, version: str | None, routing_key: str | None, rng: random.Random
) -> Choice:
    """Who answers: the requested version, else champion or canary by the canary weight.

    Raises:
        NotFound: ``version`` is not loaded.
        NotReady: the model has no loaded champion yet.
    """
    dep = slot.deployment
    if version is not None:
        for role, runner in dep.runners().items():
            if runner.version == version:
                return Choice(role, runner)
        loaded = [r.version for r in dep.runners().values()]
        raise NotFound(f"version {version} of {slot.name!r} is not served (loaded: {loaded})")
    role = choose_role(dep.weight if dep.canary else 0, routing_key, rng)
    chosen = dep.canary if role == CANARY else dep.champion
    if chosen is None:
        raise NotReady(f"model {slot.name!r} is not loaded yet")
    return Choice(role, chosen)


def shed(slot: ModelSlot) -> None:
    """Refuse at once when the model's queue is full, before paying for decoding.

    Raises:
        QueueFull: answered 429 with Retry-After.
    """
    if slot.queue.depth >= slot.queue.limit:
        raise QueueFull


def decode(body: bytes, model: LoadedVersion) -> InferRequest:
    """The request as model inputs: v2 JSON checked against ``model``, raw text tokenized.

    Raises:
        DecodeError: the body does not fit the model (inputs, shapes, datatypes, outputs).
    """
    req = decode_request(body, model.inputs, allow_text=model.tokenizer_dir is not None)
    check_outputs(req.outputs, model.output_names)
    if req.texts is not None:
        req.inputs = model.tokenize(req.texts)
    per_request = getattr(model, "request_inputs", None)  # generation: max_new_tokens, num_beams
    if per_request is not None:
        req.inputs.update(per_request(body, req.rows))
    return req


def batch(runner: Runner, req: InferRequest) -> asyncio.Future[Outputs]:
    """Queue the request on the runner's batcher; the future resolves to its outputs.

    Raises:
        QueueFull: the model's queue filled up meanwhile.
    """
    return runner.batcher.submit(req.inputs)


async def run(future: asyncio.Future[Outputs], timeout_s: float) -> Outputs:
    """The request's outputs once its batch ran.

    Raises:
        Timeout: no answer within ``timeout_s``.
        Exception: whatever ONNX Runtime raised for this request's batch.
    """
    try:
        return await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        raise Timeout(f"no answer within {timeout_s} s") from None


def encode(model: str, version: str, outputs: dict[str, Any], req: InferRequest) -> Response:
    """The v2 infer response (only the requested outputs, when the request names some).

    Raises:
        EncodeError: an output is not a tensor of a v2 datatype.
    """
    body = encode_response(model, version, outputs, req.request_id, req.outputs)
    return Response(body, media_type=JSON)
