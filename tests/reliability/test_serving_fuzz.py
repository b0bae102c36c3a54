"""Bad input on a real server: every malformed tensor -> 400 with a reason, oversized bodies ->
413, and schemathesis fuzzing every operation of the server's own OpenAPI document (no 5xx).

schemathesis is in the ``reliability`` extra only: the fuzz test skips without it, the explicit
cases run everywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.reliability.serving_helpers import secured
from tests.serving.conftest import Server

__all__ = ["secured"]  # the fixture, imported for pytest

X = {"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}


def _x(**change: Any) -> bytes:
    return orjson.dumps({"inputs": [{**X, **change}]})


def _without(key: str) -> bytes:
    return orjson.dumps({"inputs": [{k: v for k, v in X.items() if k != key}]})


def _raw(shape: str, data: str) -> bytes:
    """A body with JSON the encoder would not write (big numbers, NaN) spliced in as text."""
    item = f'{{"name": "x", "datatype": "FP32", "shape": {shape}, "data": {data}}}'
    return f'{{"inputs": [{item}]}}'.encode()


def _ids(shape: Any, data: Any, mask: bool = True) -> bytes:
    items = [{"name": "input_ids", "datatype": "INT64", "shape": shape, "data": data}]
    if mask:
        items.append({"name": "attention_mask", "datatype": "INT64", "shape": shape, "data": data})
    return orjson.dumps({"inputs": items})


# (case, model, raw body): each must answer 400 with an "error" that says why. Three of these
# answered 500 before the codec fix: a list/object as input name (unhashable), a bool in the
# shape, and a shape whose product wraps int64 to the data's size (np.prod, then reshape).
MALFORMED: list[tuple[str, str, bytes]] = [
    ("not JSON", "sec", b"this is not json"),
    ("empty body", "sec", b""),
    ("invalid UTF-8", "sec", b'\xff\xfe{"inputs": []}'),
    ("JSON null", "sec", b"null"),
    ("JSON array", "sec", b"[1, 2]"),
    ("JSON string", "sec", b'"inputs"'),
    ("no inputs", "sec", b"{}"),
    ("empty inputs", "sec", b'{"inputs": []}'),
    ("inputs not a list", "sec", b'{"inputs": {"x": 1}}'),
    ("input not an object", "sec", b'{"inputs": [5]}'),
    ("unknown input name", "sec", _x(name="nope")),
    ("input name missing", "sec", _without("name")),
    ("input name a list", "sec", _x(name=["x"])),
    ("input name an object", "sec", _x(name={"x": 1})),
    ("wrong datatype", "sec", _x(datatype="INT64")),
    ("datatype a list", "sec", _x(datatype=["FP32"])),
    ("datatype missing", "sec", _without("datatype")),
    ("BYTES to a tensor model", "sec", _x(datatype="BYTES", data=["hello"])),
    ("shape/data length mismatch", "sec", _x(data=[0.5] * 7)),
    ("shape a string", "sec", _x(shape="1,8")),
    ("shape negative", "sec", _x(shape=[-1, 8])),
    ("shape float 1e12", "sec", _raw("[1e12, 8]", "[1]")),
    ("shape 10^12 rows", "sec", _x(shape=[10**12, 8])),
    ("shape past int64", "sec", _raw("[18446744073709551615, 8]", "[1]")),
    ("shape past uint64", "sec", _raw("[1e400, 8]", "[1]")),
    ("fixed dim wrong", "sec", _x(shape=[1, 9], data=[0.5] * 9)),
    ("too many dims", "sec", _x(shape=[1, 8, 1])),
    ("zero rows", "sec", _x(shape=[0, 8], data=[])),
    ("data missing", "sec", _without("data")),
    ("data null", "sec", _x(data=None)),
    ("data ragged", "sec", _x(shape=[2, 8], data=[[0.5] * 8, [0.5] * 7])),
    ("data strings", "sec", _x(data=["a"] * 8)),
    ("data objects", "sec", _x(data=[{"a": 1}] * 8)),
    ("data nested garbage", "sec", _x(data=[[[], {}], "x", None, 1, 2, 3, 4, 5])),
    ("data 200 levels deep", "sec", _x(data=orjson.loads("[" * 200 + "]" * 200))),
    ("JSON nested past the parser limit", "sec", _raw("[1, 8]", "[" * 5000 + "]" * 5000)),
    ("NaN literal", "sec", _raw("[1, 8]", "[NaN, 1, 1, 1, 1, 1, 1, 1]")),
    ("Infinity literal", "sec", _raw("[1, 8]", "[Infinity, 1, 1, 1, 1, 1, 1, 1]")),
    ("INT64 past int64", "tok", _ids([1, 1], [2**63])),
    ("INT64 strings", "tok", _ids([1, 2], ["1", "x"])),
    ("token ids out of the vocabulary", "tok", _ids([1, 3], [1, 2, 10**6], mask=False)),
    ("batch sizes disagree", "tok", orjson.dumps({"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [2, 1], "data": [1, 1]},
    ]})),
    ("shape whose product wraps int64 to 0", "tok", _ids([2**32, 2**32], [], mask=False)),
    ("shape whose product wraps int64 to 1 row", "tok", _ids([2**63 + 1, 1], [1], mask=False)),
    ("shape huge on a dynamic axis", "tok", _ids([1, 10**15], [1], mask=False)),
    ("shape bool", "tok", _ids([True, 2], [1, 2], mask=False)),
]  # fmt: skip


def test_malformed_tensors_get_400_with_a_reason(secured: Server, scenario):
    s = scenario(
        "malformed inference requests",
        fault=f"{len(MALFORMED)} bad bodies: not JSON, wrong names/datatypes, shape/data "
        "mismatch, shapes of 1e12 and past int64, NaN/Infinity, ragged/nested garbage, too deep",
        expected="400 with a JSON error that says why for every one; never 500",
    )
    # execute
    answers: dict[str, tuple[int, str]] = {}
    with httpx.Client(base_url=secured.url, headers=secured.headers(), timeout=30) as h:
        for case, model, body in MALFORMED:
            r = h.post(
                f"/v2/models/{model}/infer",
                content=body,
                headers={"content-type": "application/json"},
            )
            json_error = r.headers.get("content-type") == "application/json"
            answers[case] = (r.status_code, r.json().get("error", "") if json_error else r.text)
    # assert
    wrong = {case: a for case, a in answers.items() if a[0] != 400 or len(a[1]) < 10}
    codes = Counter(code for code, _ in answers.values())
    s.observe(
        f"{len(answers)} cases: {dict(codes)}; e.g. shape [2^32, 2^32] -> "
        f"{answers['shape whose product wraps int64 to 0'][1][:70]!r}; not 400: {wrong or 'none'}"
    )
    assert not wrong, wrong


def test_oversized_bodies_get_413(secured: Server, scenario):
    s = scenario(
        "oversized request bodies",
        fault="9 MiB body (limit 8 MiB) with Content-Length, and streamed chunked without it",
        expected="413 for both, the chunked one cut off at the limit; the server keeps serving",
    )
    # setup
    size = 9 << 20
    url = f"{secured.url}/v2/models/sec/infer"

    def chunks() -> Iterator[bytes]:
        for _ in range(size // 65536):
            yield b" " * 65536

    with httpx.Client(headers=secured.headers(), timeout=60) as h:
        # execute
        declared = h.post(url, content=b" " * size)
        streamed = h.post(url, content=chunks())
        after = h.post(url, content=_x())
    # assert
    s.observe(
        f"declared: {declared.status_code}, chunked: {streamed.status_code}, next request: "
        f"{after.status_code}"
    )
    assert declared.status_code == 413 and streamed.status_code == 413
    assert "larger than" in declared.json()["error"]
    assert after.status_code == 200


@pytest.mark.slow
def test_schemathesis_fuzz_finds_no_server_error(secured: Server, scenario):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error

    s = scenario(
        "OpenAPI fuzzing (schemathesis)",
        fault="schemathesis positive + negative cases for every operation of /openapi.json, "
        "path name random and set to the served models",
        expected="no 5xx on any case",
    )
    # setup
    schema = schemathesis.openapi.from_url(f"{secured.url}/openapi.json")
    codes: Counter[int] = Counter()
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    # execute
    for op in operations:
        names: list[dict[str, str] | None] = [None]
        if "{name}" in op.path:
            names += [{"name": "sec"}, {"name": "tok"}]
        for mode in modes:
            for fixed in names:
                if fixed and "{version}" in op.path:
                    fixed = {**fixed, "version": "1"}
                strategy = op.as_strategy(mode, path_parameters=fixed)

                @settings(
                    max_examples=40,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=strategy)
                def run(case: Any) -> None:
                    response = case.call(base_url=secured.url, headers=secured.headers())
                    codes[response.status_code] += 1
                    if response.status_code >= 500:
                        failures.append(f"{case.method} {case.formatted_path}: {response.text}")
                    case.validate_response(response, checks=[not_a_server_error])

                try:
                    run()
                except Unsatisfiable:
                    continue  # e.g. no invalid request exists for an operation without inputs
                except Exception as exc:  # noqa: BLE001 - collected, asserted below
                    if not failures:
                        failures.append(f"{op.method.upper()} {op.path}: {exc!r}"[:500])
    # assert
    total = sum(codes.values())
    s.observe(f"{len(operations)} operations, {total} requests: {dict(sorted(codes.items()))}")
    assert secured.proc.poll() is None
    assert not failures, failures[:5]
