"""Transformer fusion (Attention, SkipLayerNorm, Gelu) with ORT's transformer optimizer."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import onnx
from onnx import numpy_helper

from bladeflow.tasks.optimize.base import OptimizationPass, PassConfig


class TransformerFusionConfig(PassConfig):
    # "auto": detected from the graph (Softmax + LayerNorm pattern -> bert).
    model_type: Literal["auto", "bert"] = "auto"
    num_heads: int = 0  # 0: detected from the graph
    hidden_size: int = 0  # 0: detected from the graph
    # 0: python fusions only. 1/2/99: ORT's graph optimizer runs first at that level (Optimum's
    # O1/O2/O99); >1 writes ISA-specific kernels into the file, so the output is for this CPU.
    opt_level: Literal[0, 1, 2, 99] = 0
    # Approximating Gelu with tanh changes outputs (Optimum's O3 does it): off by default.
    gelu_approximation: bool = False
    use_gpu: bool = False


def detect_transformer(model: onnx.ModelProto) -> dict[str, Any]:
    """Model type, hidden size and head count read from the graph (0 where not found).

    Hidden size: the most common square MatMul weight (the Q/K/V/output projections).
    Head size: the attention score scale, ``1/sqrt(head_size)`` (Mul) or ``sqrt(head_size)``
    (Div) applied before Softmax, as eager attention is exported.
    """
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    inits = {i.name: i for i in graph.initializer}
    consts = {
        n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute
    }
    squares = Counter(
        int(inits[n.input[1]].dims[0])
        for n in graph.node
        if n.op_type == "MatMul"
        and len(n.input) > 1
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 2
        and inits[n.input[1]].dims[0] == inits[n.input[1]].dims[1]
    )
    hidden = squares.most_common(1)[0][0] if squares else 0
    head_size = 0
    for n in graph.node:
        if n.op_type not in {"Div", "Mul"} or len(n.input) < 2:
            continue
        tensor = inits.get(n.input[1]) or consts.get(n.input[1])
        if tensor is None:
            continue
        arr = numpy_helper.to_array(tensor)
        if arr.size != 1:
            continue
        value = float(arr.reshape(-1)[0])
        if value <= 0:
            continue
        size = value**2 if n.op_type == "Div" else 1.0 / value**2
        whole = size >= 4 and abs(size - round(size)) < 1e-3
        if whole and hidden and hidden % round(size) == 0 and ops["Softmax"]:
            head_size = round(size)
            break
    layer_norm = ops["LayerNormalization"] or ops["ReduceMean"]
    model_type = "bert" if ops["Softmax"] and layer_norm else ""
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_heads": hidden // head_size if head_size else 0,
        "head_size": head_size if math.isfinite(head_size) else 0,
    }


class TransformerFusion(OptimizationPass):
    """Fuses transformer blocks (Attention, SkipLayerNorm, Gelu) with ORT's transformer tools."""

    name = "transformer_fusion"
    config_cls = TransformerFusionConfig
    config: TransformerFusionConfig

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._details: dict[str, Any] = {}

    def apply(self, source: Path, output: Path) -> None:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        model = onnx.load(str(source))
        found = detect_transformer(model)
        model_type = found["model_type"] or "bert"
        if self.config.model_type != "auto":
            model_type = self.config.model_type
        num_heads = self.config.num_heads or found["num_heads"]
        hidden = self.config.hidden_size or found["hidden_size"]
        if not (num_heads and hidden):
            num_heads = hidden = 0  # let the optimizer detect both per attention block
        options = FusionOptions(model_type)
        options.enable_gelu_approximation = self.config.gelu_approximation
        optimized = optimize_model(
            model,
            model_type=model_type,
            num_heads=num_heads,
            hidden_size=hidden,
            optimization_options=options,
            opt_level=self.config.opt_level,
            use_gpu=self.config.use_gpu,
        )
        optimized.save_model_to_file(str(output))
        stats = optimized.get_fused_operator_statistics()
        self._details = {
            "model_type": model_type,
            "num_heads": num_heads,
            "hidden_size": hidden,
            "detected": found,
            "fused": {k: v for k, v in stats.items() if v},
            "nodes_before": len(model.graph.node),
            "nodes_after": len(optimized.model.graph.node),
        }

    def details(self) -> dict[str, Any]:
        return self._details
