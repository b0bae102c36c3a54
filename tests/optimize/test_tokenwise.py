"""Token-wise int8 (one activation scale per row) and its place in accuracy recovery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bladeflow.core.contract import Tolerance
from bladeflow.tasks.optimize.base import PassNotApplicable, get_pass
from bladeflow.tasks.optimize.int8_tokenwise import apply_tokenwise, eligible, quantize_weight
from bladeflow.tasks.optimize.recipes import build_candidate, parse_passes
from bladeflow.tasks.validate.accuracy import compare, predict
from tests.optimize import tiny
from tests.optimize.conftest import prepare

GATE = Tolerance(atol=0.2, rtol=0.05, min_cosine=0.99)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


def _two_readers(opset: int, features: int = 24) -> onnx.ModelProto:
    """x -> MatMul mm_1 and MatMul mm_2 (the same activation), outputs y1 and y2. Below opset 13
    the weights are also listed as graph inputs, as old exporters (IR < 4) wrote them."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((features, 8)).astype(np.float32)
    w2 = rng.standard_normal((features, 5)).astype(np.float32)
    w2[:, 3] = 0.0  # an all-zero output column: its scale must not divide by zero
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm_1"),
            helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm_2"),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", features])],
        [
            helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["batch", "seq", 8]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", "seq", 5]),
        ],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    if opset < 13:
        graph.input.extend(
            helper.make_tensor_value_info(n, TensorProto.FLOAT, list(w.shape))
            for n, w in (("w1", w1), ("w2", w2))
        )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset >= 13 else 6
    return model


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_tokenwise_matches_fp32_per_row_and_shares_one_quantization(opset: int):
    # setup: rows of very different ranges, one all-zero row (1e4 apart: per-tensor int8 would
    # round the small rows to nothing)
    model = _two_readers(opset)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6, 24)).astype(np.float32)
    x[:, 0] *= 1e4
    x[1, 2] = 0.0
    want = _run(model, {"x": x})
    # execute
    converted = apply_tokenwise(model, ["mm_1", "mm_2"])
    onnx.checker.check_model(model)
    got = _run(model, {"x": x})
    # assert
    assert converted == ["mm_1", "mm_2"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("MatMulIntegerToFloat") == 2
    assert "MatMul" not in ops
    assert {i.name for i in model.graph.initializer}.isdisjoint({"w1", "w2"})
    assert [i.name for i in model.graph.input] == ["x"]  # no weight left to feed
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        assert np.all(g[1, 2] == 0.0)  # the zero row stays exactly zero
        # every row within 5% of its own scale, including the small ones next to the 1e4 rows
        # (one int8 scale for the tensor would round those rows to zero: 100% off)
        scale = np.abs(w).max(axis=-1, keepdims=True) + 1e-12
        assert float((np.abs(g - w) / scale).max()) < 0.05
        rows_g, rows_w = g.reshape(-1, g.shape[-1]), w.reshape(-1, w.shape[-1])
        live = np.abs(rows_w).max(axis=1) > 0
        cos = (rows_g * rows_w).sum(1)[live] / (
            np.linalg.norm(rows_g, axis=1) * np.linalg.norm(rows_w, axis=1)
        )[live]
        assert float(cos.min()) > 0.999


def test_eligible_skips_matmuls_without_an_fp32_2d_weight(tmp_path: Path):
    # setup: activation x activation, and a 3-D weight
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "x_t"], ["a"], name="act_act"),
            helper.make_node("MatMul", ["a", "w3"], ["y"], name="batched_weight"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 4]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [2, 4, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 4])],
        initializer=[numpy_helper.from_array(np.ones((2, 4, 4), np.float32), "w3")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # execute / assert
    assert eligible(model) == []
    assert apply_tokenwise(model, ["act_act", "batched_weight"]) == []
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(PassNotApplicable, match="no MatMul"):
        get_pass("int8_tokenwise", {}).apply(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_quantize_weight_is_symmetric_per_column():
    w = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 0.0]], dtype=np.float32)
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and scale.shape == (3,)
    assert q[:, 0].tolist() == [64, -127] and q[:, 1].tolist() == [-127, 64]
    assert q[:, 2].tolist() == [0, 0] and scale[2] == 1.0


def test_tokenwise_pass_beats_per_tensor_int8_on_a_token_outlier(tmp_path: Path):
    # setup
    prepared = prepare(tiny.token_sensitive_chain(tmp_path / "t.onnx"), tmp_path, samples=16)
    # execute
    per_tensor = build_candidate(parse_passes("int8_dynamic")[0], prepared.model, tmp_path / "a")
    tokenwise = build_candidate(parse_passes("int8_tokenwise")[0], prepared.model, tmp_path / "b")
    # assert
    outputs = [predict(c.artifact, c.session, prepared.data) for c in (per_tensor, tokenwise)]
    reports = [compare("c", out, prepared.reference, GATE, True) for out in outputs]
    assert not reports[0].passed
    assert reports[1].passed, reports[1].reason
    ops = tiny.op_counts(tokenwise.artifact.path)
    assert ops["MatMulIntegerToFloat"] == 3 and "MatMul" not in ops


def test_recovery_fixes_a_token_outlier_token_wise_not_in_fp32(tmp_path: Path):
    # setup
    prepared = prepare(tiny.token_sensitive_chain(tmp_path / "t.onnx"), tmp_path, samples=16)
    # execute
    recovered = build_candidate(
        parse_passes("mixed_precision")[0], prepared.model, tmp_path / "c", prepared.context(GATE)
    )
    # assert
    details = json.loads((Path(recovered.artifact.path).parent / "pass_config.json").read_text())
    assert details["details"]["fp32_nodes"] == []
    assert details["details"]["tokenwise_nodes"] == ["mm_b"]
    got = predict(recovered.artifact, recovered.session, prepared.data)
    assert compare("r", got, prepared.reference, GATE, True).passed
    ops = tiny.op_counts(recovered.artifact.path)
    assert ops["MatMulIntegerToFloat"] == 1 and "MatMul" not in ops


def test_recovery_without_tokenwise_keeps_the_token_outlier_in_fp32(tmp_path: Path):
    # setup
    prepared = prepare(tiny.token_sensitive_chain(tmp_path / "t.onnx"), tmp_path, samples=16)
    # execute
    recovered = build_candidate(
        parse_passes("mixed_precision:tokenwise=false")[0],
        prepared.model,
        tmp_path / "c",
        prepared.context(GATE),
    )
    # assert
    details = json.loads((Path(recovered.artifact.path).parent / "pass_config.json").read_text())
    assert details["details"]["fp32_nodes"] == ["mm_b"]
    assert details["details"]["tokenwise_nodes"] == []
