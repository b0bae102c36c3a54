"""TensorRT execution provider with optimization profiles and an engine cache (GPU only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
from pydantic import Field

from bladeflow.core.contract import ModelArtifact, SessionConfig
from bladeflow.tasks.optimize.base import OptimizationPass, PassConfig, PassContext
from bladeflow.tasks.optimize.cuda import gpu_missing

PROVIDER_OPTIONS_FILE = "provider_options.json"


class TensorrtConfig(PassConfig):
    fp16: bool = True
    # Optimization profile for dynamic dims: symbolic dim name -> (min, opt, max).
    profile: dict[str, tuple[int, int, int]] = Field(
        default_factory=lambda: {
            "batch": (1, 8, 32),
            "batch_size": (1, 8, 32),
            "sequence": (1, 128, 512),
            "sequence_length": (1, 128, 512),
        }
    )
    workspace_gb: int = 4


def profile_shapes(model: onnx.ModelProto, profile: dict[str, tuple[int, int, int]]) -> list[str]:
    """TensorRT ``trt_profile_{min,opt,max}_shapes`` strings ("in:1x16,mask:1x16") for ``model``."""
    inits = {i.name for i in model.graph.initializer}
    parts: list[list[str]] = [[], [], []]
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        for k in range(3):
            sizes = []
            for d in dims:
                if d.HasField("dim_value"):
                    sizes.append(str(d.dim_value))
                else:
                    sizes.append(str(profile.get(d.dim_param, (1, 1, 1))[k]))
            parts[k].append(f"{vi.name}:{'x'.join(sizes)}")
    return [",".join(p) for p in parts]


def tensorrt_provider_options(
    model_path: Path, config: TensorrtConfig, cache_dir: Path
) -> dict[str, str]:
    """Provider options for ORT's TensorrtExecutionProvider (engine cache + profiles)."""
    mins, opts, maxs = profile_shapes(onnx.load(str(model_path)), config.profile)
    return {
        "trt_fp16_enable": str(config.fp16).lower(),
        "trt_engine_cache_enable": "true",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "true",
        "trt_max_workspace_size": str(config.workspace_gb * 1024**3),
        "trt_profile_min_shapes": mins,
        "trt_profile_opt_shapes": opts,
        "trt_profile_max_shapes": maxs,
    }


class TensorrtExecution(OptimizationPass):
    """Runs the model on ORT's TensorRT provider with an engine cache and dynamic-shape profiles."""

    name = "tensorrt"
    config_cls = TensorrtConfig
    config: TensorrtConfig

    @classmethod
    def applicable(cls, hardware: dict[str, Any]) -> str | None:
        return gpu_missing(hardware, "TensorrtExecutionProvider")

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._options: dict[str, str] = {}

    def apply(self, source: Path, output: Path) -> None:
        # The graph is unchanged; the provider options (profiles, cache) go into the session
        # config, so validation, the benchmark and serving all build the same engine. The engine
        # cache path is relative: it resolves next to wherever the model file lives.
        shutil.copyfile(source, output)
        options = tensorrt_provider_options(source, self.config, Path("trt_cache"))
        (output.parent / PROVIDER_OPTIONS_FILE).write_text(
            json.dumps({"TensorrtExecutionProvider": options}, indent=2)
        )

    def run(
        self, model: ModelArtifact, workdir: Path, context: PassContext | None = None
    ) -> ModelArtifact:
        artifact = super().run(model, workdir, context)  # may reuse an earlier build
        saved = json.loads((workdir / PROVIDER_OPTIONS_FILE).read_text())
        self._options = saved["TensorrtExecutionProvider"]
        return artifact

    def session_config(self, current: SessionConfig) -> SessionConfig:
        return current.model_copy(
            update={
                "providers": [
                    "TensorrtExecutionProvider",
                    "CUDAExecutionProvider",
                    "CPUExecutionProvider",
                ],
                "provider_options": {
                    **current.provider_options,
                    "TensorrtExecutionProvider": dict(self._options),
                },
            }
        )
