"""Open Inference Protocol (v2) JSON <-> numpy: decode a request, encode a response.

Pure functions over bytes and arrays, so each step of the request path can be tested alone. The
datatype table here is the only one: metadata, the OpenAPI document and the client read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

# v2 datatype <-> numpy dtype of the numeric tensors. BYTES (strings) is not numeric: it is raw
# text in requests (a model with a tokenizer) and string outputs (e.g. a classifier's labels).
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
BYTES = "BYTES"
# Every datatype the server speaks, in the spec's order of kinds.
V2_DATATYPES: tuple[str, ...] = (*V2_TO_NUMPY, BYTES)

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
ORT_STRING = "tensor(string)"  # outputs only: numpy object arrays of str, answered as BYTES


class DecodeError(ValueError):
    """The request body is not a valid inference request for this model (HTTP 400)."""


class EncodeError(ValueError):
    """An output cannot be written as a v2 tensor (HTTP 500: the model's, or our, fault)."""


def v2_datatype(dtype: str | np.dtype) -> str:
    """The v2 datatype of a numpy dtype: ``float32`` -> ``FP32``, object/str -> ``BYTES``.

    Names numpy does not know (an ONNX type such as ``seq(map(string,float))``) come back upper
    case, so metadata still says what the model has.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return str(dtype).upper()
    if dt.kind in "OSU":
        return BYTES
    return NUMPY_TO_V2.get(dt.name, dt.name.upper())


@dataclass(frozen=True)
class InputMeta:
    """What a model input accepts: numpy dtype and shape (ints fixed; str/None dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @property
    def datatype(self) -> str:
        return v2_datatype(self.dtype)

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
    check_parameters(doc, "the request")
    arrays: dict[str, np.ndarray] = {}
    texts: list[str] | None = None
    for item in doc["inputs"]:
        if not isinstance(item, dict):
            raise DecodeError("each entry of 'inputs' must be an object")
        name = item.get("name")
        params = check_parameters(item, f"input {name!r}")
        if "binary_data_size" in params:
            raise DecodeError(
                f"input {name!r}: binary tensor data is not supported; send the values as JSON "
                "in 'data' (tritonclient: set_data_from_numpy(..., binary_data=False))"
            )
        if isinstance(name, str) and item.get("datatype") == BYTES and allow_text:
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
    rid = doc.get("id")
    return InferRequest(arrays, str(rid) if rid is not None else None, _requested(doc), texts)


def check_parameters(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``parameters`` of a request, input or output: an object of string/number/boolean."""
    params = item.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict) or not all(
        isinstance(v, str | int | float | bool) for v in params.values()
    ):
        raise DecodeError(
            f"{where}: 'parameters' must be an object whose values are strings, numbers or booleans"
        )
    return params


def _requested(doc: Mapping[str, Any]) -> list[str] | None:
    """The names in the request's ``outputs`` (None: every output)."""
    outputs = doc.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise DecodeError("'outputs' must be a list of objects with a 'name'")
    names = []
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DecodeError("each entry of 'outputs' must be an object with a string 'name'")
        # An output's parameters ("binary_data", ...) ask for extensions this server does not
        # advertise; the answer is plain JSON, which every client reads.
        check_parameters(entry, f"output {entry['name']!r}")
        names.append(entry["name"])
    return names or None


def check_outputs(requested: Sequence[str] | None, available: Sequence[str]) -> None:
    """Refuse requested output names the model does not have (before anything runs)."""
    unknown = [n for n in requested or () if n not in available]
    if unknown:
        raise DecodeError(f"unknown output(s) {unknown}; the model has {list(available)}")


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
    outputs: Mapping[str, Any],
    request_id: str | None = None,
    only: Sequence[str] | None = None,
) -> bytes:
    """A v2 infer response as JSON bytes (numeric arrays serialized natively by orjson).

    Raises:
        EncodeError: an output is not a tensor of a v2 datatype (e.g. a sequence of maps).
    """
    items = [
        encode_tensor(name, value)
        for name, value in outputs.items()
        if only is None or name in only
    ]
    doc: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": items}
    if request_id is not None:
        doc["id"] = request_id
    try:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError as exc:
        raise EncodeError(str(exc)) from None


def encode_tensor(name: str, value: Any) -> dict[str, Any]:
    """One output as a v2 tensor: numbers as a flat array, strings as BYTES (UTF-8 text)."""
    if not isinstance(value, np.ndarray):
        raise EncodeError(
            f"output {name!r} is a {type(value).__name__}, not a tensor; export the model with "
            "tensor outputs (e.g. skl2onnx options={'zipmap': False})"
        )
    datatype = v2_datatype(value.dtype)
    flat = np.ascontiguousarray(value).reshape(-1)
    data: Any = flat
    if datatype == BYTES:
        data = [_text(name, v) for v in flat.tolist()]
    elif datatype not in V2_TO_NUMPY:
        raise EncodeError(f"output {name!r} has dtype {value.dtype}, which has no v2 datatype")
    return {"name": name, "datatype": datatype, "shape": list(value.shape), "data": data}


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise EncodeError(f"output {name!r} holds bytes that are not UTF-8 text") from None
    raise EncodeError(f"output {name!r} holds a {type(value).__name__}, not a string")
