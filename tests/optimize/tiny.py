"""Tiny models for the optimization-pass tests, built in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.models import _save


def bert(path: Path, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32, 2 heads) exported with TorchScript and eager attention.

    Inputs ``input_ids``/``attention_mask`` [batch, sequence] (int64), output ``last_hidden_state``.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        attn_implementation="eager",
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(ids)
    path.parent.mkdir(parents=True, exist_ok=True)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(
            Wrapper(),
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "last_hidden_state": {0: "batch", 1: "sequence"},
            },
            opset_version=17,
            dynamo=False,
        )
    return path


def sensitive_chain(path: Path, features: int = 16, seed: int = 0) -> Path:
    """x -> MatMul ``mm_a`` -> Relu -> Mul(outlier) -> MatMul ``mm_b`` -> MatMul ``mm_c`` -> y.

    Feature 0 of ``mm_b``'s input is scaled by 1000 and its weight row by 1e-3, so the fp32 result
    is ordinary but one int8 scale for the whole activation rounds every other feature to zero:
    only ``mm_b`` breaks under dynamic quantization; ``mm_a`` and ``mm_c`` quantize well.
    """
    rng = np.random.default_rng(seed)
    wa = rng.standard_normal((features, features)).astype(np.float32) / 4
    wb = rng.standard_normal((features, features)).astype(np.float32) / 4
    wc = rng.standard_normal((features, features)).astype(np.float32) / 4
    scale = np.ones(features, dtype=np.float32)
    scale[0] = 1000.0
    wb[0, :] *= 1e-3
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Mul", ["r", "scale"], ["s"], name="outlier"),
            helper.make_node("MatMul", ["s", "wb"], ["b"], name="mm_b"),
            helper.make_node("MatMul", ["b", "wc"], ["y"], name="mm_c"),
        ],
        "sensitive",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        initializer=[
            numpy_helper.from_array(wa, "wa"),
            numpy_helper.from_array(wb, "wb"),
            numpy_helper.from_array(wc, "wc"),
            numpy_helper.from_array(scale, "scale"),
        ],
    )
    return _save(graph, path)


def op_counts(path: str | Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def sensitive_cnn(path: Path, channels: int = 8, seed: int = 0) -> Path:
    """image -> Conv ``conv_a`` -> Relu -> Mul(outlier) -> Conv ``conv_b`` -> Conv ``conv_c``.

    The CNN analogue of :func:`sensitive_chain`: channel 0 of ``conv_b``'s input is scaled by 1000
    and its weights by 1e-3, so static int8 on ``conv_b`` rounds every other channel to zero; the
    other two convolutions quantize well.
    """
    rng = np.random.default_rng(seed)
    shape = (channels, channels, 3, 3)
    wa = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) / 4
    wb = rng.standard_normal(shape).astype(np.float32) / 8
    wc = rng.standard_normal(shape).astype(np.float32) / 8
    scale = np.ones((1, channels, 1, 1), dtype=np.float32)
    scale[0, 0] = 1000.0
    wb[:, 0] *= 1e-3
    pad = {"pads": [1, 1, 1, 1]}
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "wa"], ["a"], name="conv_a", **pad),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Mul", ["r", "scale"], ["s"], name="outlier"),
            helper.make_node("Conv", ["s", "wb"], ["b"], name="conv_b", **pad),
            helper.make_node("Conv", ["b", "wc"], ["y"], name="conv_c", **pad),
        ],
        "sensitive_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels, 16, 16])],
        initializer=[
            numpy_helper.from_array(wa, "wa"),
            numpy_helper.from_array(wb, "wb"),
            numpy_helper.from_array(wc, "wc"),
            numpy_helper.from_array(scale, "scale"),
        ],
    )
    return _save(graph, path)


def token_sensitive_chain(path: Path, features: int = 16, tokens: int = 8, seed: int = 0) -> Path:
    """x [batch, tokens, features] -> MatMul ``mm_a`` -> Relu -> Mul(token 0 x1000) -> MatMul
    ``mm_b`` -> Mul(token 0 x1e-3) -> MatMul ``mm_c`` -> y.

    The transformer ``[CLS]`` pattern: one token of ``mm_b``'s input is 1000x larger than the rest
    (the fp32 result is ordinary: it is scaled back after ``mm_b``), so one int8 scale per tensor
    rounds every other token to zero, while a scale per token (``int8_tokenwise``) keeps them.
    """
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((features, features)).astype(np.float32) / 4 for _ in range(3)]
    up = np.ones((tokens, 1), dtype=np.float32)
    up[0] = 1000.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Mul", ["r", "up"], ["s"], name="outlier"),
            helper.make_node("MatMul", ["s", "wb"], ["b"], name="mm_b"),
            helper.make_node("Mul", ["b", "down"], ["d"], name="back"),
            helper.make_node("MatMul", ["d", "wc"], ["y"], name="mm_c"),
        ],
        "token_sensitive",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", tokens, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", tokens, features])],
        initializer=[
            *(numpy_helper.from_array(w, f"w{n}") for w, n in zip(weights, "abc", strict=True)),
            numpy_helper.from_array(up, "up"),
            numpy_helper.from_array((1.0 / up).astype(np.float32), "down"),
        ],
    )
    return _save(graph, path)
