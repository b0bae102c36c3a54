"""Graph simplification with onnxslim: constant folding, dead-node and redundant-op removal."""

from __future__ import annotations

from pathlib import Path

import onnx

from bladeflow.tasks.optimize.base import OptimizationPass, PassConfig


class SimplifyConfig(PassConfig):
    constant_folding: bool = True
    # Shape inference can fail on graphs with contrib ops; onnxslim then keeps the graph as is.
    skip_shape_inference: bool = False


class Simplify(OptimizationPass):
    """Simplifies the graph with onnxslim (constant folding, dead nodes, redundant ops)."""

    name = "simplify"
    config_cls = SimplifyConfig
    config: SimplifyConfig

    def apply(self, source: Path, output: Path) -> None:
        import onnxslim  # heavy import (sympy): only when the pass runs

        model = onnxslim.slim(
            str(source),
            skip_optimizations=None if self.config.constant_folding else ["constant_folding"],
            no_shape_infer=self.config.skip_shape_inference,
        )
        onnx.save(model, str(output))
