"""int8 dynamic quantization (weights int8 offline, activations quantized per run)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
from pydantic import Field

from bladeflow.core.environment import hardware
from bladeflow.tasks.optimize.base import OptimizationPass, PassConfig

WeightType = Literal["auto", "QInt8", "QUInt8"]
DEFAULT_OPS = ["MatMul", "Gemm", "Attention"]  # embeddings (Gather) stay fp32: cheap, sensitive


def has_vnni(hw: dict[str, Any]) -> bool:
    isa = set(hw.get("isa", []))
    return bool(isa & {"avx512_vnni", "avx_vnni", "amx_int8"})


def isa_choice(hw: dict[str, Any]) -> tuple[str, bool]:
    """(weight type, reduce_range) for this CPU's int8 GEMM kernels.

    - VNNI / AMX (x86) and ARM dot-product: u8 x s8 products accumulate exactly; full 8-bit s8.
    - AVX2 / AVX-512 without VNNI: ORT's u8 x s8 kernel (vpmaddubsw) adds pairs of products in
      int16 and can saturate; reduce_range (7-bit weights) avoids it, at some precision cost.
    """
    if has_vnni(hw) or hw.get("arch") in {"aarch64", "arm64"}:
        return "QInt8", False
    return "QInt8", True


class QuantizeDynamicConfig(PassConfig):
    per_channel: bool = True  # one scale per output channel: far more accurate on transformers
    weight_type: WeightType = "auto"  # auto: from the CPU's ISA (isa_choice)
    reduce_range: bool | Literal["auto"] = "auto"
    # Empty list: every op ORT can quantize dynamically.
    op_types: list[str] = Field(default_factory=lambda: list(DEFAULT_OPS))
    # Kept in fp32 (accuracy recovery fills this).
    nodes_to_exclude: list[str] = Field(default_factory=list)
    preprocess: bool = False  # ORT's quant_pre_process (symbolic shape inference skipped)


def resolve(config: QuantizeDynamicConfig, hw: dict[str, Any]) -> QuantizeDynamicConfig:
    """``config`` with the ISA-dependent choices filled in (what gets recorded)."""
    weight, reduce = isa_choice(hw)
    return config.model_copy(
        update={
            "weight_type": weight if config.weight_type == "auto" else config.weight_type,
            "reduce_range": reduce if config.reduce_range == "auto" else config.reduce_range,
        }
    )


def quantize_dynamic_file(
    source: Path,
    output: Path,
    config: QuantizeDynamicConfig,
    nodes_to_exclude: Sequence[str] = (),
    nodes_to_quantize: Sequence[str] | None = None,
) -> None:
    """Run ORT's ``quantize_dynamic`` on ``source`` with a resolved ``config``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_input = source
    with tempfile.TemporaryDirectory(prefix="bladeflow-q-") as tmp:
        if config.preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            model_input = Path(tmp) / "pre.onnx"
            quant_pre_process(str(source), str(model_input), skip_symbolic_shape=True)
        quantize_dynamic(
            str(model_input),
            str(output),
            op_types_to_quantize=list(config.op_types) or None,
            per_channel=config.per_channel,
            reduce_range=bool(config.reduce_range),
            weight_type=QuantType[str(config.weight_type)],
            nodes_to_exclude=[*config.nodes_to_exclude, *nodes_to_exclude],
            nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
            # Fused graphs hold contrib ops whose output types ORT's quantizer cannot infer.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


class QuantizeDynamic(OptimizationPass):
    """Quantizes weights to int8 and activations at run time (ISA-aware u8/s8, reduce_range)."""

    name = "int8_dynamic"
    config_cls = QuantizeDynamicConfig
    config: QuantizeDynamicConfig

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.config = resolve(self.config, hardware())

    def apply(self, source: Path, output: Path) -> None:
        quantize_dynamic_file(source, output, self.config)
