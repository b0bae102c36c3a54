"""bench/registered.py's download + session part, on tiny versions in a real SQLite registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.minilm import fp32_matmuls
from bench.registered import embedding_runner, load_registered, uris
from bladeflow.core import registry
from bladeflow.core.contract import PassRecord, SessionConfig
from bladeflow.core.runtime import make_session
from bladeflow.core.settings import Settings
from tests.models import mlp
from tests.serving.conftest import Registry


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    settings = Settings.from_env(home=tmp_path / "home", environ={})
    settings.home.mkdir(parents=True)
    Path(settings.artifact_root.removeprefix("file://")).mkdir(parents=True)
    return Registry(settings)


def hidden_states(path: Path, vocab: int = 16, dim: int = 4) -> Path:
    """input_ids/attention_mask -> last_hidden_state [batch, seq, dim] (an embedding lookup)."""
    rng = np.random.default_rng(1)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "emb")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["last_hidden_state"]),
            helper.make_node("Identity", ["attention_mask"], ["unused_mask"]),
        ],
        "hidden",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "seq", dim]
            ),
            helper.make_tensor_value_info("unused_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        initializer=[emb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_downloads_and_runs_the_version_with_its_recipe_session(
    reg: Registry, tmp_path: Path
) -> None:
    # setup: the runtime file says 1 thread; the recipe tag (which wins) says 2, basic, no spin
    source = mlp(tmp_path / "src" / "mlp.onnx")
    version = reg.register("tiny", source, alias=None)
    recipe_session = SessionConfig(
        intra_op_num_threads=2, graph_optimization_level="basic", allow_spinning=False
    )
    steps = [PassRecord(name="ort_graph", config={"level": "basic"})]
    client = reg.client()
    client.set_model_version_tag(
        "tiny", version, registry.TAG_RECIPE, registry.recipe_json(steps, recipe_session)
    )
    client.set_model_version_tag(
        "tiny", version, registry.TAG_OPTIMIZE_PARAMS, json.dumps({"accuracy": "cosine>=0.99"})
    )
    tracking, registry_uri = uris(str(reg.settings.home), None)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)

    # execute
    got = load_registered("tiny", version, tracking, registry_uri, tmp_path / "work")

    # assert: the downloaded file, run with the recipe's session, computes what the source does
    assert tracking == reg.settings.tracking_uri
    assert got.model_file.is_file() and got.model_file.is_relative_to(got.folder)
    assert got.session_config == recipe_session
    assert got.config_source.startswith(f"tag {registry.TAG_RECIPE}")
    options = got.loaded.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert [s["name"] for s in got.recipe] == ["ort_graph", registry.RUNTIME_STEP]
    assert got.optimize_accuracy == "cosine>=0.99"
    expected = make_session(source).run(None, {"x": x})[0]
    np.testing.assert_allclose(got.loaded.predict({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)
    assert fp32_matmuls(got.model_file) == (2, 2)


def test_without_a_recipe_tag_the_runtime_file_and_as_served_turns_spinning_off(
    reg: Registry, tmp_path: Path
) -> None:
    # setup: a version whose recipe tag is gone (an old registration): the logged runtime file
    version = reg.register("old", mlp(tmp_path / "src" / "mlp.onnx"), alias=None)
    reg.client().delete_model_version_tag("old", version, registry.TAG_RECIPE)
    tracking, registry_uri = uris(None, reg.settings.tracking_uri)

    # execute
    plain = load_registered("old", version, tracking, registry_uri, tmp_path / "a")
    served = load_registered("old", version, tracking, registry_uri, tmp_path / "b", True)

    # assert
    assert plain.config_source == registry.RUNTIME_FILE
    assert plain.session_config == SessionConfig(intra_op_num_threads=1)
    assert plain.optimize_accuracy is None  # no optimize-params tag: unknown, not "plain"
    assert served.session_config.allow_spinning is False
    assert served.session_config.intra_op_num_threads == 1


def test_embedding_runner_mean_pools_hidden_states_over_the_mask(
    reg: Registry, tmp_path: Path
) -> None:
    # setup
    path = hidden_states(tmp_path / "src" / "hidden.onnx")
    version = reg.register("enc", path, alias=None)
    tracking, registry_uri = uris(str(reg.settings.home), None)
    got = load_registered("enc", version, tracking, registry_uri, tmp_path / "work")
    ids = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)

    # execute
    out = embedding_runner(got.loaded)({"input_ids": ids, "attention_mask": mask, "other": ids})

    # assert: padding does not count, rows are unit length
    emb = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    want = np.stack([emb[[1, 2, 3]].mean(0), emb[[4, 5]].mean(0)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
