"""float16 conversion with ONNX Runtime's own converter (fp32 inputs/outputs kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from pydantic import Field

from bladeflow.tasks.optimize.base import OptimizationPass, PassConfig

# Ops left in fp32: ORT's default block list (ML ops) plus ops whose fp16 kernels are missing on
# CPU or lose too much range. Cast is blocked too: onnxconverter-common's converter produced
# "Type (tensor(float16)) of output arg does not match" on Cast outputs (STACK-NOTES).
EXTRA_BLOCKED = ["Cast", "Range", "CumSum", "Upsample", "NonMaxSuppression", "TopK"]


class Float16Config(PassConfig):
    keep_io_types: bool = True  # callers keep feeding and reading float32
    # Added to ORT's DEFAULT_OP_BLOCK_LIST and EXTRA_BLOCKED.
    op_block_list: list[str] = Field(default_factory=list)
    # Node names kept in fp32 (accuracy recovery fills this).
    node_block_list: list[str] = Field(default_factory=list)


def to_float16(model: onnx.ModelProto, config: Float16Config) -> onnx.ModelProto:
    """``model`` converted to fp16 under ``config``."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = sorted({*DEFAULT_OP_BLOCK_LIST, *EXTRA_BLOCKED, *config.op_block_list})
    converted: onnx.ModelProto = convert_float_to_float16(
        model,
        keep_io_types=config.keep_io_types,
        op_block_list=blocked,
        node_block_list=list(config.node_block_list) or None,
    )
    return converted


class Float16(OptimizationPass):
    """Converts float32 weights and compute to float16 (for GPU targets), keeping fp32 I/O."""

    name = "fp16"
    config_cls = Float16Config
    config: Float16Config

    def apply(self, source: Path, output: Path) -> None:
        onnx.save(to_float16(onnx.load(str(source)), self.config), str(output))

    def details(self) -> dict[str, Any]:
        return {"node_block_list": list(self.config.node_block_list)}
