"""Open Inference Protocol (v2) conformance on a real ``bladeflow serve`` process: Triton's own
HTTP client (tritonclient) round-trips health, metadata, readiness and inference; unknown outputs,
string (BYTES) outputs, versioned readiness and error counting follow the spec."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bladeflow.serving.codec import V2_DATATYPES
from tests import models
from tests.serving.conftest import (
    LABEL_X,
    LABEL_Y,
    TOKEN,
    Registry,
    Server,
    infer_body,
    label_classifier,
    metric_value,
    start_server,
)

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("oip-models")
    return {"mlp": models.mlp(d / "mlp.onnx"), "labels": label_classifier(d / "labels.onnx")}


@pytest.fixture(scope="module")
def server(
    reg: Registry, paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    reg.register("mlp", paths["mlp"])
    reg.register("labels", paths["labels"])
    srv = start_server(
        reg, tmp_path_factory.mktemp("oip-logs"), ["mlp", "labels"], "--poll-interval", "30",
        token=TOKEN,
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture
def triton(server: Server) -> Iterator[object]:
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def test_tritonclient_health_metadata_and_readiness(triton, server: Server):  # type: ignore[no-untyped-def]
    # execute
    live = triton.is_server_live(headers=AUTH)
    ready = triton.is_server_ready(headers=AUTH)
    meta = triton.get_server_metadata(headers=AUTH)
    model = triton.get_model_metadata("mlp", headers=AUTH)
    versioned = triton.get_model_metadata("mlp", model_version="1", headers=AUTH)
    model_ready = triton.is_model_ready("mlp", headers=AUTH)
    v1_ready = triton.is_model_ready("mlp", model_version="1", headers=AUTH)
    v9_ready = triton.is_model_ready("mlp", model_version="9", headers=AUTH)
    unknown_ready = triton.is_model_ready("nope", headers=AUTH)
    # assert
    assert live and ready and model_ready and v1_ready
    assert not v9_ready and not unknown_ready
    assert meta["name"] == "bladeflow" and meta["extensions"] == []
    assert model["name"] == "mlp" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert model["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    assert versioned["inputs"] == model["inputs"]


def test_tritonclient_infer_round_trip(triton, paths: dict[str, Path]):  # type: ignore[no-untyped-def]
    # setup
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    given = httpclient.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=False)
    wanted = [httpclient.InferRequestedOutput("y", binary_data=False)]
    # execute
    plain = triton.infer("mlp", [given], headers=AUTH, request_id="r-7")
    versioned = triton.infer("mlp", [given], model_version="1", outputs=wanted, headers=AUTH)
    # assert
    expected = ort.InferenceSession(str(paths["mlp"])).run(None, {"x": x})[0]
    for result in (plain, versioned):
        np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-5, atol=1e-5)
        assert result.get_response()["model_version"] == "1"
    assert plain.get_response()["id"] == "r-7"


def test_string_outputs_round_trip_as_bytes(triton, server: Server):  # type: ignore[no-untyped-def]
    # setup
    given = httpclient.InferInput("X", list(LABEL_X.shape), "FP32")
    given.set_data_from_numpy(LABEL_X, binary_data=False)
    # execute
    result = triton.infer("labels", [given], headers=AUTH)
    meta = triton.get_model_metadata("labels", headers=AUTH)
    with server.http() as h:
        only_label = h.post(
            "/v2/models/labels/infer",
            json={**infer_body(LABEL_X, "X"), "outputs": [{"name": "label"}]},
        )
    # assert
    labels = result.as_numpy("label")
    assert [v.decode() if isinstance(v, bytes) else v for v in labels] == LABEL_Y.tolist()
    assert result.as_numpy("probabilities").shape == (len(LABEL_X), 3)
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["label"] == "BYTES"
    assert only_label.status_code == 200, only_label.text
    assert only_label.json()["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [len(LABEL_X)], "data": LABEL_Y.tolist()}
    ]


def test_unknown_requested_output_answers_400_and_is_counted(server: Server):
    # setup
    body = {**infer_body(np.ones((1, 8), np.float32)), "outputs": [{"name": "nope"}]}
    before = metric_value(server.metrics(), "bladeflow_requests_total", model="mlp", status="400")
    # execute
    with server.http() as h:
        r = h.post("/v2/models/mlp/infer", json=body)
    after = metric_value(server.metrics(), "bladeflow_requests_total", model="mlp", status="400")
    # assert
    assert r.status_code == 400 and "unknown output" in r.json()["error"]
    assert after == before + 1


def test_versioned_ready_route(server: Server):
    # execute
    with server.http() as h:
        v1 = h.get("/v2/models/mlp/versions/1/ready")
        v9 = h.get("/v2/models/mlp/versions/9/ready")
        unknown = h.get("/v2/models/nope/versions/1/ready")
    # assert
    assert v1.status_code == 200 and v1.json() == {"name": "mlp", "ready": True}
    assert v9.status_code == 404 and "not served" in v9.json()["error"]
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]


def test_every_error_answer_of_infer_is_counted(server: Server):
    # setup
    body = infer_body(np.ones((1, 8), np.float32))
    before = server.metrics()
    # execute
    with server.http() as h:
        no_version = h.post("/v2/models/mlp/versions/9/infer", json=body)
        no_model = h.post("/v2/models/nope/infer", json=body)
        bad_params = h.post("/v2/models/mlp/infer", json={**body, "parameters": [1]})
    no_token = server.http().post("/v2/models/mlp/infer", json=body, headers={"authorization": ""})
    after = server.metrics()

    def added(**labels: str) -> float:
        name = "bladeflow_requests_total"
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    # assert
    assert (no_version.status_code, no_model.status_code) == (404, 404)
    assert bad_params.status_code == 400 and "parameters" in bad_params.json()["error"]
    assert no_token.status_code == 401
    assert added(model="mlp", status="404") == 1  # a version that is not served
    assert added(model="", status="404") == 1  # an unknown model: no label of its name
    assert added(model="mlp", status="400") == 1
    assert added(model="", status="401") == 1


def test_binary_tensor_input_is_refused_with_the_fix(triton):  # type: ignore[no-untyped-def]
    # setup
    given = httpclient.InferInput("x", [1, 8], "FP32")
    given.set_data_from_numpy(np.ones((1, 8), np.float32), binary_data=True)
    # execute / assert
    with pytest.raises(InferenceServerException, match="binary_data=False"):
        triton.infer("mlp", [given], headers=AUTH)


def test_openapi_datatypes_are_the_codecs(server: Server):
    # execute
    with server.http() as h:
        spec = h.get("/openapi.json").json()
    # assert
    tensor = spec["components"]["schemas"]["InferRequest"]["properties"]["inputs"]["items"]
    assert tensor["properties"]["datatype"]["enum"] == list(V2_DATATYPES)
    assert {"UINT16", "UINT32", "UINT64", "BYTES"} <= set(V2_DATATYPES)
    assert "/v2/models/{name}/versions/{version}/ready" in spec["paths"]
