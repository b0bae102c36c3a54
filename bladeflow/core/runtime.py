"""ONNX Runtime sessions built from a :class:`~bladeflow.core.contract.SessionConfig`.

Shared by validation, benchmarking and serving, so a model is always run the way its recipe says.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bladeflow.core.contract import SessionConfig
from bladeflow.core.errors import ModelFileError

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# What ONNX Runtime raises for a model it cannot load (bad graph, unknown operator, bad argument).
LOAD_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.InvalidGraph,
    ort.capi.onnxruntime_pybind11_state.NotImplemented,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
)


def graph_level(name: str) -> ort.GraphOptimizationLevel:
    """Map a level name (disable/basic/extended/all) to ONNX Runtime's enum."""
    try:
        return _LEVELS[name]
    except KeyError:
        raise ValueError(
            f"unknown graph optimization level {name!r}; use one of {', '.join(_LEVELS)}"
        ) from None


def session_options(config: SessionConfig) -> ort.SessionOptions:
    """ONNX Runtime session options for ``config``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = graph_level(config.graph_optimization_level)
    so.intra_op_num_threads = config.intra_op_num_threads
    so.inter_op_num_threads = config.inter_op_num_threads
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if config.execution_mode == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    if not config.allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def available_providers(config: SessionConfig) -> list[str]:
    """The providers of ``config`` that this ONNX Runtime build has, CPU always last."""
    have = set(ort.get_available_providers())
    chosen = [p for p in config.providers if p in have and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def provider_list(
    config: SessionConfig, model_path: str | Path
) -> list[str | tuple[str, dict[str, str]]]:
    """The providers to pass to ONNX Runtime: available ones, with their options where given.

    Relative ``*_path`` options (engine/timing caches) resolve against the model's folder.
    """
    folder = Path(model_path).resolve().parent
    out: list[str | tuple[str, dict[str, str]]] = []
    for provider in available_providers(config):
        options = config.provider_options.get(provider)
        if not options:
            out.append(provider)
            continue
        resolved = {
            k: str(folder / v) if k.endswith("_path") and not Path(v).is_absolute() else v
            for k, v in options.items()
        }
        out.append((provider, resolved))
    return out


def make_session(path: str | Path, config: SessionConfig | None = None) -> ort.InferenceSession:
    """Create an inference session; a model ONNX Runtime cannot load raises ModelFileError."""
    config = config or SessionConfig()
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(config), providers=provider_list(config, path)
        )
    except LOAD_ERRORS as exc:
        raise ModelFileError(
            f"ONNX Runtime {ort.__version__} cannot load {path}: {_first_line(exc)}. If it names "
            "an operator that is not implemented, re-export the model with an older opset or "
            "register the operator as a custom op."
        ) from exc


def run(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], output_names: list[str]
) -> dict[str, np.ndarray]:
    """Run one batch and return outputs by name."""
    values = session.run(output_names, dict(feeds))
    return {name: np.asarray(v) for name, v in zip(output_names, values, strict=True)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
