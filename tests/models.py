"""Tiny ONNX models built in code for the tests: each a few nodes, each with one purpose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path, opset: int = OPSET) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp(
    path: Path,
    features: int = 8,
    hidden: int = 16,
    outputs: int = 4,
    seed: int = 0,
    batch: int | str = "batch",
    scale: float = 1.0,
) -> Path:
    """features -> Linear -> Relu -> Linear -> outputs ("x" -> "y")."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(
        (rng.standard_normal((features, hidden)) * scale).astype(np.float32), "w1"
    )
    b1 = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, outputs)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, outputs])],
        initializer=[w1, b1, w2],
    )
    return _save(graph, path)


def token_model(path: Path, vocab: int = 32, dim: int = 8) -> Path:
    """Embedding lookup of int64 ids, masked mean: inputs input_ids/attention_mask [batch, seq]."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "emb")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axes2"], ["m3"]),
            helper.make_node("Mul", ["e", "m3"], ["em"]),
            helper.make_node("ReduceSum", ["em", "axes"], ["s"], keepdims=0),
            helper.make_node("ReduceSum", ["m3", "axes"], ["n"], keepdims=0),
            helper.make_node("Div", ["s", "n"], ["pooled"]),
        ],
        "tokens",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch", "sequence"]
            ),
        ],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", dim])],
        initializer=[emb, axes, numpy_helper.from_array(np.array([2], dtype=np.int64), "axes2")],
    )
    return _save(graph, path)


def traced_branch_model() -> tuple[object, dict[str, object]]:
    """A torch module with a data-dependent branch: tracing keeps only the branch the example
    took, so the ONNX export matches on small inputs and silently differs on large ones.

    Used as a ``module:callable`` source (``tests.models:traced_branch_model``).
    """
    import torch

    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.abs().max() > 5):  # a Python branch: invisible to the tracer
                return x * 2
            return x + 0

    return Branchy(), {"x": torch.zeros(2, 4)}


def unknown_op(path: Path) -> Path:
    """Uses an operator from a domain ONNX Runtime does not implement."""
    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
