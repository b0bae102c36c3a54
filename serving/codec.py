"""Open Inference Protocol (v2) JSON <-> numpy: decode a request, encode a response.

Pure functions over bytes and arrays, so each step of the request path can be tested alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

# v2 datatype <-> numpy dtype. BYTES (strings) is only used for raw text.
V2_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2: dict[str, str] = {v: k for k, v in V2_TO_NUMPY.items()}

# ONNX Runtime's type strings ("tensor(float)") -> numpy dtype names.
ORT_TO_NUMPY: dict[str, str] = {
    "tensor(bool)": "bool",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}


class DecodeError(ValueError):
    """The request body is not a valid inference request for this model (HTTP 400)."""


@dataclass(frozen=True)
class InputMeta:
    """What a model input accepts: numpy dtype and shape (ints fixed; str/None dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @property
    def datatype(self) -> str:
        return NUMPY_TO_V2.get(self.dtype, self.dtype.upper())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": [d if isinstance(d, int) else -1 for d in self.shape],
        }


@dataclass
class InferRequest:
    """A decoded request: arrays by input name (batch along axis 0), plus bookkeeping."""

    inputs: dict[str, np.ndarray]
    request_id: str | None = None
    outputs: list[str] | None = None
    texts: list[str] | None = field(default=None)

    @property
    def rows(self) -> int:
        first = next(iter(self.inputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1


# Inputs a tokenizer-style model may omit: filled in with these values, shaped like input_ids.
OPTIONAL_TOKEN_INPUTS = {"attention_mask": 1, "token_type_ids": 0}


def decode_request(
    body: bytes, inputs: Mapping[str, InputMeta], *, allow_text: bool = False
) -> InferRequest:
    """Parse a v2 JSON infer request and check it against the model's inputs.

    Args:
        body: The raw HTTP body.
        inputs: The model inputs by name.
        allow_text: Accept one BYTES input of strings (the model version carries a tokenizer).

    Raises:
        DecodeError: with a reason the caller can act on.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise DecodeError("body must be a JSON object with a non-empty list 'inputs'")
    arrays: dict[str, np.ndarray] = {}
    texts: list[str] | None = None
    for item in doc["inputs"]:
        if not isinstance(item, dict):
            raise DecodeError("each entry of 'inputs' must be an object")
        name = item.get("name")
        if isinstance(name, str) and item.get("datatype") == "BYTES" and allow_text:
            texts = _decode_text(item)
            continue
        if not isinstance(name, str) or name not in inputs:  # a list/object name is not hashable
            raise DecodeError(f"unknown input {name!r}; the model takes {sorted(inputs)}")
        arrays[name] = decode_tensor(item, inputs[name])
    if texts is None:
        _fill_optional(arrays, inputs)
        missing = sorted(set(inputs) - set(arrays))
        if missing:
            raise DecodeError(f"missing input(s) {missing}")
        rows = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        if len(rows) > 1:
            raise DecodeError(f"inputs disagree on the batch size (axis 0): {sorted(rows)}")
    outputs = doc.get("outputs")
    names = None
    if isinstance(outputs, list):
        names = [str(o.get("name")) for o in outputs if isinstance(o, dict)]
    rid = doc.get("id")
    return InferRequest(arrays, str(rid) if rid is not None else None, names, texts)


def decode_tensor(item: Mapping[str, Any], meta: InputMeta) -> np.ndarray:
    """One v2 input tensor -> numpy array of the model's dtype and the given shape."""
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise DecodeError(f"input {meta.name!r}: 'shape' must be a list of non-negative integers")
    datatype = item.get("datatype")
    if datatype != meta.datatype:
        raise DecodeError(
            f"input {meta.name!r}: datatype must be {meta.datatype}, got {datatype!r}"
        )
    if len(shape) != len(meta.shape):
        raise DecodeError(
            f"input {meta.name!r}: expected {len(meta.shape)} dimensions "
            f"{meta.describe()['shape']}, got shape {shape}"
        )
    for i, (want, got) in enumerate(zip(meta.shape, shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise DecodeError(f"input {meta.name!r}: dimension {i} must be {want}, got {got}")
    if not shape or shape[0] < 1:
        raise DecodeError(f"input {meta.name!r}: the batch dimension (axis 0) must be >= 1")
    data = item.get("data")
    if data is None:
        raise DecodeError(f"input {meta.name!r}: 'data' is missing")
    try:
        arr = np.asarray(data, dtype=meta.dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(f"input {meta.name!r}: data is not {meta.datatype}: {exc}") from None
    count = math.prod(shape)  # exact: np.prod wraps around past int64 (then reshape fails)
    if arr.size != count:
        raise DecodeError(
            f"input {meta.name!r}: shape {shape} needs {count} values, data has {arr.size}"
        )
    return arr.reshape(shape)


def _decode_text(item: Mapping[str, Any]) -> list[str]:
    data = item.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise DecodeError("a BYTES input must carry a non-empty flat list of strings in 'data'")
    return list(data)


def _fill_optional(arrays: dict[str, np.ndarray], inputs: Mapping[str, InputMeta]) -> None:
    ids = arrays.get("input_ids")
    if ids is None:
        return
    for name, value in OPTIONAL_TOKEN_INPUTS.items():
        if name in inputs and name not in arrays:
            arrays[name] = np.full(ids.shape, value, dtype=inputs[name].dtype)


def encode_response(
    model_name: str,
    version: str,
    outputs: Mapping[str, np.ndarray],
    request_id: str | None = None,
    only: Sequence[str] | None = None,
) -> bytes:
    """A v2 infer response as JSON bytes (numpy arrays serialized natively by orjson)."""
    items = []
    for name, arr in outputs.items():
        if only and name not in only:
            continue
        flat = np.ascontiguousarray(arr).reshape(-1)
        items.append(
            {
                "name": name,
                "datatype": NUMPY_TO_V2.get(arr.dtype.name, arr.dtype.name.upper()),
                "shape": list(arr.shape),
                "data": flat,
            }
        )
    doc: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": items}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(message: str) -> bytes:
    """The v2 error object."""
    return orjson.dumps({"error": message})
