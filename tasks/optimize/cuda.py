"""CUDA execution provider: runs the model on an NVIDIA GPU (skipped with a reason without one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bladeflow.core.contract import SessionConfig
from bladeflow.tasks.optimize.base import OptimizationPass, PassConfig


def gpu_missing(hw: dict[str, Any], provider: str) -> str | None:
    """Why ``provider`` cannot run here, or None."""
    import onnxruntime as ort

    if not hw.get("gpus"):
        return "no NVIDIA GPU found (nvidia-smi lists none)"
    if provider not in ort.get_available_providers():
        return (
            f"this onnxruntime build ({ort.__version__}) has no {provider}; install the gpu extra "
            "(onnxruntime-gpu) in its own environment"
        )
    return None


class CudaConfig(PassConfig):
    device_id: int = 0


class CudaExecution(OptimizationPass):
    """Runs the model on the CUDA execution provider (CPU fallback for unsupported ops)."""

    name = "cuda"
    config_cls = CudaConfig
    config: CudaConfig
    changes_graph = False

    @classmethod
    def applicable(cls, hardware: dict[str, Any]) -> str | None:
        return gpu_missing(hardware, "CUDAExecutionProvider")

    def apply(self, source: Path, output: Path) -> None:  # pragma: no cover - never called
        raise NotImplementedError("the cuda pass only changes the session")

    def session_config(self, current: SessionConfig) -> SessionConfig:
        return current.model_copy(
            update={"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
        )
