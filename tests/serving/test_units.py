"""The request path's pieces alone: decode, merge/pad, split, route, compare, encode, and the
one error-to-status mapping."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import orjson
import pytest

from bladeflow.serving.batching import QueueFull, merge, split
from bladeflow.serving.codec import (
    DecodeError,
    EncodeError,
    InputMeta,
    check_outputs,
    decode_request,
    encode_response,
)
from bladeflow.serving.errors import Timeout, as_serving_error
from bladeflow.serving.routing import CANARY, CHAMPION, choose_role, compare

X = {"x": InputMeta("x", "float32", ("batch", 3))}
TOKENS = {
    "input_ids": InputMeta("input_ids", "int64", ("batch", "sequence")),
    "attention_mask": InputMeta("attention_mask", "int64", ("batch", "sequence")),
}


def _body(*inputs: dict) -> bytes:
    return orjson.dumps({"inputs": list(inputs), "id": "r1"})


def test_decode_builds_arrays_of_the_model_dtype_and_shape():
    # setup
    body = _body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]})
    # execute
    req = decode_request(body, X)
    # assert
    assert req.inputs["x"].dtype == np.float32 and req.inputs["x"].shape == (2, 3)
    assert req.request_id == "r1" and req.rows == 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (orjson.dumps({"inputs": []}), "non-empty list"),
        (
            _body({"name": "z", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}),
            "unknown input",
        ),
        (
            _body({"name": "x", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}),
            "datatype must be FP32",
        ),
        (
            _body({"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}),
            "dimension 1 must be 3",
        ),
        (
            _body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3]}),
            "needs 6 values",
        ),
        (
            _body({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}),
            "expected 2 dimensions",
        ),
        (
            _body({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ["a", "b", "c"]}),
            "not FP32",
        ),
    ],
)
def test_decode_rejects_malformed_requests_with_a_reason(body: bytes, reason: str):
    # execute / assert
    with pytest.raises(DecodeError, match=reason):
        decode_request(body, X)


def test_decode_fills_a_missing_attention_mask_with_ones():
    # setup
    body = _body({"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [5, 6, 7]})
    # execute
    req = decode_request(body, TOKENS)
    # assert
    np.testing.assert_array_equal(req.inputs["attention_mask"], np.ones((1, 3), np.int64))


def test_merge_pads_token_inputs_to_the_longest_and_split_trims_back():
    # setup
    a = {"input_ids": np.array([[1, 2]]), "attention_mask": np.ones((1, 2), np.int64)}
    b = {
        "input_ids": np.array([[3, 4, 5, 6], [7, 8, 9, 1]]),
        "attention_mask": np.ones((2, 4), np.int64),
    }
    # execute
    feeds, spans = merge([a, b], TOKENS)
    hidden = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    parts = split({"h": hidden}, spans, {"h": ("batch", "sequence", 2)})
    # assert
    assert feeds["input_ids"].shape == (3, 4)
    np.testing.assert_array_equal(feeds["attention_mask"][0], [1, 1, 0, 0])
    assert parts[0]["h"].shape == (1, 2, 2) and parts[1]["h"].shape == (2, 4, 2)
    np.testing.assert_array_equal(parts[1]["h"], hidden[1:3])


def test_split_without_padding_cuts_rows():
    # setup
    feeds, spans = merge(
        [{"x": np.zeros((1, 3), np.float32)}, {"x": np.ones((2, 3), np.float32)}], X
    )
    # execute
    parts = split({"y": feeds["x"] * 2}, spans, {"y": ("batch", 3)})
    # assert
    assert [p["y"].shape[0] for p in parts] == [1, 2]
    assert parts[1]["y"].sum() == 12


def test_routing_by_weight_and_sticky_keys():
    # setup
    keys = [f"user-{i}" for i in range(400)]
    # execute
    first = [choose_role(30, k) for k in keys]
    again = [choose_role(30, k) for k in keys]
    more = [choose_role(60, k) for k in keys]
    # assert
    assert first == again  # sticky
    share = first.count(CANARY) / len(keys)
    assert 0.2 < share < 0.4
    assert all(m == CANARY for f, m in zip(first, more, strict=True) if f == CANARY)  # monotone
    assert choose_role(0, "k") == CHAMPION and choose_role(100, None) == CANARY


def test_compare_reports_agreement_and_max_diff():
    # setup
    ref = {"y": np.array([1.0, 2.0], np.float32)}
    # execute
    same = compare(ref, {"y": np.array([1.0, 2.00001], np.float32)}, 1e-4, 1e-3)
    other = compare(ref, {"y": np.array([1.0, 3.0], np.float32)}, 1e-4, 1e-3)
    # assert
    assert same[0] and same[1] < 1e-4
    assert not other[0] and other[1] == pytest.approx(1.0)


def test_encode_response_names_the_version():
    # execute
    body = encode_response("m", "7", {"y": np.array([[1.5, 2.0]], np.float32)}, "r1")
    # assert
    doc = orjson.loads(body)
    assert doc["model_version"] == "7" and doc["id"] == "r1"
    assert doc["outputs"][0] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [1, 2],
        "data": [1.5, 2.0],
    }


def test_import_serving_loads_no_heavy_frameworks():
    # setup
    code = (
        "import sys, bladeflow.serving.app, bladeflow.serving.fleet, bladeflow.app.serve_cli, "
        "bladeflow.serving.client, bladeflow.serving.server; "
        "heavy = ('torch', 'tensorflow', 'bladeflow.tasks.optimize', 'transformers'); "
        "bad = [m for m in heavy if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    # execute
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # assert
    assert done.returncode == 0, done.stdout + done.stderr


def test_encode_response_writes_string_outputs_as_bytes():
    # setup
    outputs = {"label": np.array(["cat", "dog"], dtype=object), "p": np.ones((2, 1), np.uint16)}
    # execute
    doc = orjson.loads(encode_response("m", "1", outputs))
    # assert
    assert doc["outputs"][0] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["cat", "dog"],
    }
    assert doc["outputs"][1]["datatype"] == "UINT16"


def test_encode_response_refuses_outputs_that_are_not_tensors():
    # execute / assert
    with pytest.raises(EncodeError, match="not a tensor"):
        encode_response("m", "1", {"probs": [{"cat": 0.5}]})


def test_decode_checks_parameters_and_requested_outputs():
    # setup
    x = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
    ok = orjson.dumps({"inputs": [x], "parameters": {"binary_data_output": True}})
    bad = orjson.dumps({"inputs": [{**x, "parameters": {"k": [1]}}]})
    # execute
    req = decode_request(ok, X)
    # assert
    assert req.outputs is None
    with pytest.raises(DecodeError, match="parameters"):
        decode_request(bad, X)
    with pytest.raises(DecodeError, match="unknown output"):
        check_outputs(["nope"], ["y"])


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (DecodeError("bad"), 400),
        (QueueFull(), 429),
        (type("InvalidArgument", (Exception,), {})("shape"), 400),
        (EncodeError("odd"), 500),
        (ZeroDivisionError("our bug"), 500),
        (Timeout("late"), 504),
    ],
)
def test_one_place_maps_errors_to_statuses(exc: Exception, status: int):
    # execute
    err = as_serving_error(exc, "m", "1")
    # assert
    assert err.status == status and err.message
