"""A small Python client for ``bladeflow serve`` (Open Inference Protocol v2 over HTTP).

from bladeflow.serving.client import Client
with Client("http://127.0.0.1:8080", token=...) as c:
    out = c.infer("intent", {"x": np.ones((1, 8), np.float32)})
    out.outputs["y"], out.version
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import numpy as np
import orjson

from bladeflow.serving.codec import BYTES, NUMPY_TO_V2, V2_TO_NUMPY

RETRY_STATUSES = {429, 503}


class InferenceError(Exception):
    """The server answered with an error (after retries, for 429/503)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class InferResult:
    """Outputs by name, and the model version that answered."""

    outputs: dict[str, np.ndarray]
    version: str
    model: str


def encode_request(inputs: Mapping[str, Any], request_id: str | None = None) -> bytes:
    """A v2 request body: numpy arrays as tensors, a list of strings as BYTES (raw text)."""
    items: list[dict[str, Any]] = []
    for name, value in inputs.items():
        if isinstance(value, list | tuple) and value and all(isinstance(t, str) for t in value):
            items.append({"name": name, "shape": [len(value)], "datatype": BYTES, "data": value})
            continue
        arr = np.ascontiguousarray(value)
        datatype = NUMPY_TO_V2.get(arr.dtype.name)
        if datatype is None:
            raise TypeError(f"input {name!r}: dtype {arr.dtype} has no v2 datatype")
        items.append(
            {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": arr.reshape(-1)}
        )
    doc: dict[str, Any] = {"inputs": items}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_response(body: bytes) -> InferResult:
    """A v2 response body -> numpy outputs (BYTES as object arrays of str)."""
    doc = orjson.loads(body)
    outputs = {o["name"]: _array(o) for o in doc["outputs"]}
    return InferResult(outputs, str(doc.get("model_version")), str(doc.get("model_name")))


def _array(tensor: Mapping[str, Any]) -> np.ndarray:
    dtype = object if tensor["datatype"] == BYTES else V2_TO_NUMPY.get(tensor["datatype"])
    if dtype is None:
        raise TypeError(f"output {tensor['name']!r}: unknown datatype {tensor['datatype']!r}")
    return np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])


class Client:
    """A synchronous client with timeouts and retries on 429 (queue full) and 503 (loading).

    Args:
        url: Server base URL, e.g. ``http://127.0.0.1:8080``.
        token: Bearer token, when the server requires one.
        timeout_s: Per-attempt timeout.
        retries: Extra attempts after a 429/503 or a connection error.
        backoff_s: First wait between attempts (doubled each time, or the server's Retry-After).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
    ):
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s

    def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        routing_key: str | None = None,
    ) -> InferResult:
        """Run ``inputs`` (arrays by input name, or a list of strings for text) on ``name``."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
        body = encode_request(inputs)
        headers = {"x-routing-key": routing_key} if routing_key else None
        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.post(path, content=body, headers=headers)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                if last:
                    raise
                time.sleep(wait)
                wait *= 2
                continue
            if response.status_code == 200:
                return decode_response(response.content)
            if response.status_code in RETRY_STATUSES and not last:
                time.sleep(_retry_after(response, wait))
                wait *= 2
                continue
            raise InferenceError(response.status_code, _message(response))
        raise AssertionError("unreachable")  # pragma: no cover

    def ready(self) -> bool:
        return self._http.get("/v2/health/ready").status_code == 200

    def metadata(self, name: str) -> dict[str, Any]:
        response = self._http.get(f"/v2/models/{name}")
        if response.status_code != 200:
            raise InferenceError(response.status_code, _message(response))
        return dict(response.json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def infer(
    name: str, inputs: Mapping[str, Any], url: str = "http://127.0.0.1:8080", **kwargs: Any
) -> InferResult:
    """One-shot :meth:`Client.infer` (opens and closes a connection)."""
    with Client(url, **kwargs) as c:
        return c.infer(name, inputs)


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return min(5.0, float(response.headers.get("retry-after", default)))
    except ValueError:
        return default


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text
