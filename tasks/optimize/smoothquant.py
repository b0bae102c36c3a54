"""SmoothQuant-style equalization: move activation outliers into the weights before int8.

Dynamic int8 gives one scale to a whole activation tensor, so a few outlier channels (common in
transformers' LayerNorm outputs and FFN inputs) leave the rest of the channels a handful of levels.
For a MatMul ``Y = X W`` and any positive per-channel ``s``, ``Y = (X / s) (diag(s) W)``: dividing
channel ``j`` of X by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` flattens the activation while
the (per-channel quantized) weights absorb it. The output of this pass is fp32 and computes the
same function as its input (checked on the calibration data before it is written).

Where ``1/s`` goes, for the activation X feeding a group of MatMul/Attention nodes:
- LayerNormalization / SkipLayerNormalization / EmbedLayerNormalization producing X with no other
  consumer: folded into its gamma and beta (free).
- Attention producing X (the attention output feeding the output projection), no other consumer:
  folded into the V columns of its QKV weight and bias (softmax(QK^T) V is linear in V; free).
- otherwise (post-LN BERT: every LayerNorm output also feeds the residual): a per-channel ``Mul``
  before the group when ``insert_mul`` is on, else the pair is skipped.

``alpha`` is searched on the calibration data: the value whose int8 (dynamic, per-channel) model is
closest to the fp32 model by the gate's metric (worst per-sample cosine) wins; when no alpha beats
the unsmoothed model, the input is written unchanged.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from pydantic import Field

from bladeflow.tasks.optimize.base import (
    OptimizationPass,
    PassConfig,
    PassContext,
    PassNotApplicable,
)
from bladeflow.tasks.optimize.int8_dynamic import QuantizeDynamicConfig
from bladeflow.tasks.optimize.int8_static import calibration_data
from bladeflow.tasks.optimize.sensitivity import cosine_measure, dynamic_int8, run_model
from bladeflow.tasks.validate.data import Dataset

# op type -> (index of gamma, index of beta) among its inputs; X is output 0.
_NORMS = {
    "LayerNormalization": (1, 2),
    "SkipLayerNormalization": (2, 3),
    "EmbedLayerNormalization": (5, 6),
}
_CONSUMERS = {"MatMul", "Attention"}
# fp32 equivalence: worst per-sample cosine of the equalized vs the input model, and max error
# relative to the output's scale (fp32 reassociation noise only).
_EQUIVALENT_COSINE = 1.0 - 1e-6
_EQUIVALENT_REL = 1e-3


class SmoothQuantConfig(PassConfig):
    alphas: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    # Where 1/s cannot be folded (the activation has other consumers), insert a Mul before the
    # group; off: such pairs are skipped.
    insert_mul: bool = True
    calibration_samples: int = 64  # first N validation samples
    # The int8_dynamic config the alpha search scores against (what the recipe quantizes with).
    quant: dict[str, Any] = Field(default_factory=lambda: {"per_channel": True})
    max_scale: float = 1e4  # s clipped to [1/max_scale, max_scale]


@dataclass
class Group:
    """One activation X and the MatMul/Attention nodes that read it, with where 1/s goes."""

    tensor: str
    consumers: list[int]  # positions in graph.node
    fold: str  # "norm", "attention_v" or "mul"
    producer: int | None = None
    weights: list[str] = field(default_factory=list)


def find_groups(model: onnx.ModelProto, insert_mul: bool = True) -> list[Group]:
    """The activations that can be equalized, grouped by tensor, with their fold target."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(index)
    graph_outputs = {o.name for o in graph.output}
    groups = []
    for tensor, nodes in readers.items():
        consumers = [i for i in nodes if _consumer_weight(graph.node[i], tensor, inits)]
        if not consumers:
            continue
        at = producers.get(tensor)
        producer = graph.node[at] if at is not None else None
        exclusive = len(consumers) == len(nodes) and tensor not in graph_outputs
        fold = "mul"
        if exclusive and producer is not None and tensor == producer.output[0]:
            if producer.op_type in _NORMS and _foldable_norm(producer, inits):
                fold = "norm"
            elif producer.op_type == "Attention" and _foldable_attention(producer, inits):
                fold = "attention_v"
        if fold == "mul" and not insert_mul:
            continue
        weights = [str(_consumer_weight(graph.node[i], tensor, inits)) for i in consumers]
        groups.append(Group(tensor, consumers, fold, at, weights))
    return groups


def _consumer_weight(node: onnx.NodeProto, tensor: str, inits: dict[str, Any]) -> str | None:
    """The 2-D weight initializer of a MatMul/Attention reading ``tensor`` as its input 0."""
    if node.op_type not in _CONSUMERS or len(node.input) < 2 or node.input[0] != tensor:
        return None
    weight = inits.get(node.input[1])
    if weight is None or len(weight.dims) != 2 or node.input[1] == tensor:
        return None
    if node.op_type == "Attention" and any(
        a.name == "qkv_hidden_sizes" for a in node.attribute
    ):  # unequal Q/K/V widths: keep it simple, not equalized
        return None
    return str(node.input[1])


def _foldable_norm(node: onnx.NodeProto, inits: dict[str, Any]) -> bool:
    gamma, _ = _NORMS[node.op_type]
    return len(node.input) > gamma and node.input[gamma] in inits


def _foldable_attention(node: onnx.NodeProto, inits: dict[str, Any]) -> bool:
    if any(a.name == "qkv_hidden_sizes" for a in node.attribute):
        return False
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return False
    # past/present state or extra outputs would carry the scaled V on: not folded
    return len([o for o in node.output if o]) == 1 and len(node.input) <= 4


def activation_max(model: onnx.ModelProto, tensors: list[str], data: Dataset) -> dict[str, Any]:
    """max |x| per channel (last axis) of each tensor over ``data``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in have:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    with tempfile.TemporaryDirectory(prefix="bladeflow-sq-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(probe, str(path))
        outputs = run_model(path, data)
    return {
        name: np.abs(outputs[name]).reshape(-1, outputs[name].shape[-1]).max(axis=0)
        for name in tensors
    }


def smooth(
    model: onnx.ModelProto,
    groups: list[Group],
    act_max: dict[str, np.ndarray],
    alpha: float,
    max_scale: float = 1e4,
) -> onnx.ModelProto:
    """A copy of ``model`` with every group equalized at ``alpha`` (fp32, same function)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = list(graph.node)
    new_inits: dict[str, onnx.TensorProto] = {}
    new_nodes: list[tuple[int, onnx.NodeProto]] = []  # (insert before position, node)

    def put(name: str, value: np.ndarray) -> str:
        # a later group may scale the same tensor again (a node both reads and makes one)
        arrays[name] = value.astype(np.float32)
        new_inits[name] = numpy_helper.from_array(arrays[name], name)
        return name

    for index, group in enumerate(groups):
        w_max = np.max(
            [np.abs(_input_rows(arrays[nodes[c].input[1]])).max(axis=1) for c in group.consumers],
            axis=0,
        )
        x_max = act_max[group.tensor]
        s = np.power(np.maximum(x_max, 1e-8), alpha) / np.power(np.maximum(w_max, 1e-8), 1 - alpha)
        s = np.where((x_max > 0) & (w_max > 0), s, 1.0)
        s = np.clip(s, 1.0 / max_scale, max_scale).astype(np.float32)
        tag = f"smoothquant_{index}"
        for consumer in group.consumers:
            target = nodes[consumer]
            weight = target.input[1]
            target.input[1] = put(f"{weight}_{tag}", arrays[weight] * s[:, None])
        if group.fold == "norm" and group.producer is not None:
            producer = nodes[group.producer]
            for position in _NORMS[producer.op_type]:
                if len(producer.input) > position and producer.input[position] in arrays:
                    old = producer.input[position]
                    producer.input[position] = put(f"{old}_{tag}", arrays[old] / s)
        elif group.fold == "attention_v" and group.producer is not None:
            producer = nodes[group.producer]
            w, b = arrays[producer.input[1]].copy(), arrays[producer.input[2]].copy()
            hidden = w.shape[1] // 3
            w[:, 2 * hidden :] /= s
            b[2 * hidden :] /= s
            producer.input[1] = put(f"{producer.input[1]}_{tag}", w)
            producer.input[2] = put(f"{producer.input[2]}_{tag}", b)
        else:
            scaled = f"{group.tensor}_{tag}"
            mul = onnx.helper.make_node(
                "Mul", [group.tensor, put(f"{tag}_inv_scale", 1.0 / s)], [scaled], name=tag
            )
            for consumer in group.consumers:
                nodes[consumer].input[0] = scaled
            new_nodes.append((min(group.consumers), mul))
    graph.initializer.extend(new_inits.values())
    # before its first consumer, latest position first so earlier positions stay valid
    for position, mul in sorted(new_nodes, key=lambda item: -item[0]):
        graph.node.insert(position, mul)
    _drop_unused_initializers(graph)
    return out


def _input_rows(weight: np.ndarray) -> np.ndarray:
    return weight.reshape(weight.shape[0], -1)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


class SmoothQuant(OptimizationPass):
    """Equalizes activation outliers into the weights (fp32, same function) for better int8."""

    name = "smoothquant"
    config_cls = SmoothQuantConfig
    config: SmoothQuantConfig
    uses_context = True

    def __init__(self, config: Any = None):
        super().__init__(config)
        if not self.config.alphas or any(not 0.0 <= a <= 1.0 for a in self.config.alphas):
            from bladeflow.core.errors import UserInputError

            raise UserInputError(
                f"smoothquant alphas must be a non-empty list within [0, 1], got "
                f"{self.config.alphas}"
            )
        QuantizeDynamicConfig(**self.config.quant)  # reject a bad quant config now
        self._details: dict[str, Any] = {}

    def model_skip_reason(self, op_types: set[str]) -> str | None:
        if op_types & _CONSUMERS:
            return None
        return "the model has no MatMul/Attention node to equalize"

    def apply(self, source: Path, output: Path) -> None:
        self.apply_in_context(source, output, None)

    def apply_in_context(self, source: Path, output: Path, context: PassContext | None) -> None:
        data = calibration_data(context, self.config.calibration_samples)
        model = onnx.load(str(source))
        groups = find_groups(model, self.config.insert_mul)
        if not groups:
            raise PassNotApplicable("no MatMul/Attention with a weight initializer to equalize")
        act_max = activation_max(model, [g.tensor for g in groups], data)
        quantize = dynamic_int8(QuantizeDynamicConfig(**self.config.quant))
        reference = run_model(source, data)
        scores: dict[str, float] = {}
        best: tuple[float, float | None] = (-np.inf, None)
        with tempfile.TemporaryDirectory(prefix="bladeflow-sq-") as tmp:
            work = Path(tmp)

            def int8_cosine(path: Path) -> float:
                quantized = work / "int8.onnx"
                quantize(path, quantized, [], None)
                return float(cosine_measure(run_model(quantized, data), reference).min())

            # a private copy: ORT's quantizer writes ``<model>-inferred.onnx`` beside its input,
            # and other recipes may be quantizing the same shared file right now
            unsmoothed = work / "unsmoothed.onnx"
            shutil.copyfile(source, unsmoothed)
            scores["none"] = int8_cosine(unsmoothed)
            best = (scores["none"], None)
            for alpha in self.config.alphas:
                candidate = work / f"alpha{alpha}.onnx"
                onnx.save(smooth(model, groups, act_max, alpha, self.config.max_scale), candidate)
                scores[str(alpha)] = int8_cosine(candidate)
                if scores[str(alpha)] > best[0]:
                    best = (scores[str(alpha)], alpha)
        chosen = best[1]
        result = model if chosen is None else smooth(model, groups, act_max, chosen)
        onnx.save(result, str(output))
        equivalence = _check_equivalent(output, data, reference)
        self._details = {
            "groups": len(groups),
            "folds": {
                kind: sum(g.fold == kind for g in groups) for kind in ("norm", "attention_v", "mul")
            },
            "alpha": chosen,
            "int8_min_cosine_by_alpha": scores,
            "fp32_equivalence": equivalence,
        }

    def details(self) -> dict[str, Any]:
        return self._details


def _check_equivalent(path: Path, data: Dataset, reference: Dataset) -> dict[str, float]:
    """The equalized fp32 model against its input on ``data``; RuntimeError beyond fp32 noise."""
    got = run_model(path, data)
    cosine = float(cosine_measure(got, reference).min())
    rel = max(
        float(np.abs(got[k] - v).max() / max(float(np.abs(v).max()), 1e-30))
        for k, v in reference.items()
    )
    if cosine < _EQUIVALENT_COSINE or rel > _EQUIVALENT_REL:
        raise RuntimeError(
            f"smoothquant changed the fp32 model's outputs (worst cosine {cosine:.8f}, max error "
            f"{rel:.3g} of the output's scale): a bug, please report it with the model"
        )
    return {"min_cosine": cosine, "max_rel_error": rel}
