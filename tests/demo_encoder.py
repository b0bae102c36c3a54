"""The demo model: a small MLP encoder built in code, with the decomposed LayerNorm and GELU
patterns that exporters emit and ONNX Runtime fuses -- so optimization has real work to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEMO_NAME = "demo-encoder"


def build_demo_model(
    path: Path,
    features: int = 256,
    hidden: int = 1024,
    outputs: int = 128,
    layers: int = 3,
    seed: int = 0,
) -> Path:
    """Write an ONNX MLP (Linear -> LayerNorm -> GELU, ``layers`` times) with a dynamic batch."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    x, width = "features", features
    for i in range(layers):
        w = const(f"w{i}", rng.standard_normal((width, hidden)) / np.sqrt(width))
        b = const(f"b{i}", rng.standard_normal(hidden) * 0.1)
        nodes += [
            helper.make_node("MatMul", [x, w], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", b], [f"lin{i}"]),
        ]
        # LayerNorm, decomposed the way exporters write it.
        eps, two = const(f"eps{i}", np.array(1e-5)), const(f"two{i}", np.array(2.0))
        gamma = const(f"gamma{i}", 1 + 0.1 * rng.standard_normal(hidden))
        beta = const(f"beta{i}", 0.1 * rng.standard_normal(hidden))
        nodes += [
            helper.make_node("ReduceMean", [f"lin{i}"], [f"mu{i}"], axes=[-1]),
            helper.make_node("Sub", [f"lin{i}", f"mu{i}"], [f"xc{i}"]),
            helper.make_node("Pow", [f"xc{i}", two], [f"sq{i}"]),
            helper.make_node("ReduceMean", [f"sq{i}"], [f"var{i}"], axes=[-1]),
            helper.make_node("Add", [f"var{i}", eps], [f"vare{i}"]),
            helper.make_node("Sqrt", [f"vare{i}"], [f"std{i}"]),
            helper.make_node("Div", [f"xc{i}", f"std{i}"], [f"norm{i}"]),
            helper.make_node("Mul", [f"norm{i}", gamma], [f"scaled{i}"]),
            helper.make_node("Add", [f"scaled{i}", beta], [f"ln{i}"]),
        ]
        # GELU (erf form): 0.5 * x * (1 + erf(x / sqrt(2))).
        sqrt2, one, half = (
            const(f"sqrt2_{i}", np.array(np.sqrt(2.0))),
            const(f"one{i}", np.array(1.0)),
            const(f"half{i}", np.array(0.5)),
        )
        nodes += [
            helper.make_node("Div", [f"ln{i}", sqrt2], [f"gd{i}"]),
            helper.make_node("Erf", [f"gd{i}"], [f"ge{i}"]),
            helper.make_node("Add", [f"ge{i}", one], [f"ga{i}"]),
            helper.make_node("Mul", [f"ln{i}", f"ga{i}"], [f"gm{i}"]),
            helper.make_node("Mul", [f"gm{i}", half], [f"h{i}"]),
        ]
        x, width = f"h{i}", hidden
    w = const("w_out", rng.standard_normal((width, outputs)) / np.sqrt(width))
    nodes.append(helper.make_node("MatMul", [x, w], ["embedding"]))

    graph = helper.make_graph(
        nodes,
        "bladeflow_demo_encoder",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", outputs])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bladeflow-demo"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_demo_data(path: Path, samples: int = 256, features: int = 256, seed: int = 1) -> Path:
    """Validation inputs for the demo model, saved as ``.npz`` keyed by input name."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=rng.standard_normal((samples, features)).astype(np.float32))
    return path
