"""int8 static quantization (QDQ) calibrated on the user's validation data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field

from bladeflow.core.contract import SessionConfig
from bladeflow.core.environment import hardware
from bladeflow.tasks.optimize.base import (
    OptimizationPass,
    PassConfig,
    PassContext,
    PassNotApplicable,
)
from bladeflow.tasks.optimize.int8_dynamic import isa_choice
from bladeflow.tasks.validate.data import Dataset, batches


class QuantizeStaticConfig(PassConfig):
    method: Literal["MinMax", "Entropy", "Percentile"] = "MinMax"
    # Only MatMul/Gemm by default: QDQ on every op of MiniLM dropped cosine to ~0.3-0.5.
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm"])
    per_channel: bool = True
    activation_type: Literal["QUInt8", "QInt8"] = "QUInt8"
    weight_type: Literal["auto", "QInt8", "QUInt8"] = "auto"
    reduce_range: bool | Literal["auto"] = "auto"
    calibration_samples: int = 64  # first N validation samples
    calibration_batch: int = 8
    percentile: float = 99.999  # for method=Percentile
    nodes_to_exclude: list[str] = Field(default_factory=list)
    # Skip the pass (SKIPPED with the reason) when the graph has none of these ops, e.g. ["Conv"]
    # for the CNN recipe: static QDQ pays on convolutions and hurt transformers' accuracy here.
    requires_ops: list[str] = Field(default_factory=list)


def missing_ops(op_types: set[str], wanted: Sequence[str]) -> str | None:
    """Why a graph with ``op_types`` gives a pass needing one of ``wanted`` nothing to do."""
    if not wanted or op_types & set(wanted):
        return None
    return f"the model has no {'/'.join(wanted)} node, which this recipe quantizes"


def graph_op_types(path: str | Path) -> set[str]:
    """Op types in the ONNX graph at ``path`` (weights are not loaded)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {node.op_type for node in graph.node}


def require_ops(source: Path, wanted: Sequence[str]) -> None:
    """PassNotApplicable unless the graph at ``source`` has at least one op of ``wanted``."""
    why = missing_ops(graph_op_types(source), wanted) if wanted else None
    if why:
        raise PassNotApplicable(why)


class DatasetReader:
    """ORT CalibrationDataReader over validation arrays: one batch per ``get_next``."""

    def __init__(self, data: Dataset, batch: int):
        self._batches = iter(list(batches(data, batch)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_data(context: PassContext | None, samples: int) -> Dataset:
    """The first ``samples`` samples of the context's validation data."""
    if context is None:
        raise PassNotApplicable(
            "static quantization calibrates on validation data: call build_candidate with a "
            "PassContext"
        )
    with np.load(context.data.path, allow_pickle=False) as npz:
        return {k: npz[k][:samples] for k in npz.files}


def quantize_static_file(
    source: Path,
    output: Path,
    config: QuantizeStaticConfig,
    data: Dataset,
    nodes_to_exclude: Sequence[str] = (),
    nodes_to_quantize: Sequence[str] | None = None,
) -> None:
    """Run ORT's ``quantize_static`` (QDQ) calibrated on ``data``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    weight, reduce = isa_choice(hardware())
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if config.method == "Percentile":
        extra["CalibPercentile"] = config.percentile
    quantize_static(
        str(source),
        str(output),
        DatasetReader(data, config.calibration_batch),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(config.op_types) or None,
        per_channel=config.per_channel,
        reduce_range=reduce if config.reduce_range == "auto" else bool(config.reduce_range),
        activation_type=QuantType[config.activation_type],
        weight_type=QuantType[weight if config.weight_type == "auto" else config.weight_type],
        nodes_to_exclude=[*config.nodes_to_exclude, *nodes_to_exclude],
        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
        calibrate_method=CalibrationMethod[config.method],
        extra_options=extra,
    )


class QuantizeStatic(OptimizationPass):
    """Quantizes weights and activations to int8 (QDQ), calibrated on the validation data."""

    name = "int8_static"
    config_cls = QuantizeStaticConfig
    config: QuantizeStaticConfig
    uses_context = True

    def apply(self, source: Path, output: Path) -> None:
        self.apply_in_context(source, output, None)

    def model_skip_reason(self, op_types: set[str]) -> str | None:
        return missing_ops(op_types, self.config.requires_ops)

    def apply_in_context(self, source: Path, output: Path, context: PassContext | None) -> None:
        require_ops(source, self.config.requires_ops)
        data = calibration_data(context, self.config.calibration_samples)
        quantize_static_file(source, output, self.config, data)

    def session_config(self, current: SessionConfig) -> SessionConfig:
        # QDQ pairs become QLinearConv/QLinearMatMul only when ORT optimizes the graph at load.
        return current.model_copy(update={"graph_optimization_level": "all"})
