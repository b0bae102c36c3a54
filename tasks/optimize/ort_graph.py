"""ONNX Runtime graph optimization, applied offline and saved as a new model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import onnxruntime as ort

from bladeflow.core.contract import SessionConfig
from bladeflow.core.runtime import graph_level
from bladeflow.tasks.optimize.base import OptimizationPass, PassConfig


class OrtGraphConfig(PassConfig):
    # 'extended' output runs on any CPU; 'all' adds layout transforms (NCHWc) specific to this ISA.
    level: Literal["basic", "extended", "all"] = "extended"


class OrtGraphOptimization(OptimizationPass):
    """Runs ONNX Runtime's graph optimizer offline (constant folding, fusions, layout)."""

    name = "ort_graph"
    config_cls = OrtGraphConfig
    config: OrtGraphConfig

    def apply(self, source: Path, output: Path) -> None:
        so = ort.SessionOptions()
        so.graph_optimization_level = graph_level(self.config.level)
        so.optimized_model_filepath = str(output)
        so.log_severity_level = 3
        ort.InferenceSession(str(source), sess_options=so, providers=["CPUExecutionProvider"])

    def session_config(self, current: SessionConfig) -> SessionConfig:
        # Already optimized: re-running the optimizer at load only costs start-up time.
        return current.model_copy(update={"graph_optimization_level": "disable"})
