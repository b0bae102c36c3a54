"""Runtime tuning: session settings (threads, execution mode, spinning) as a recipe step."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from bladeflow.core.contract import SessionConfig
from bladeflow.tasks.optimize.base import OptimizationPass, PassConfig


@functools.cache
def physical_cores() -> int:
    """Physical cores (not hyper-threads) of this machine; ORT's threads scale with these."""
    pairs: set[tuple[str, str]] = set()
    physical, core = "", ""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
            pairs.add((physical, core))
    return max(len(pairs), 1) if pairs else max((os.cpu_count() or 2) // 2, 1)


class SessionTuningConfig(PassConfig):
    # "cores" = physical cores (hyper-threads share one FMA unit, so more threads rarely help);
    # 0 = ONNX Runtime's own choice; any other number is used as is.
    threads: int | Literal["cores"] | None = None
    inter_op_threads: int | None = None
    execution_mode: Literal["sequential", "parallel"] | None = None
    # Spinning intra-op threads burn the cores between runs; on a shared or busy machine turning
    # it off was measured to raise throughput a lot (see STACK-NOTES).
    spinning: bool | None = None


class SessionTuning(OptimizationPass):
    """Sets how ONNX Runtime runs the model (threads, execution mode, spinning); graph unchanged."""

    name = "session"
    config_cls = SessionTuningConfig
    config: SessionTuningConfig
    changes_graph = False

    def apply(self, source: Path, output: Path) -> None:  # pragma: no cover - never called
        raise NotImplementedError("session tuning does not change the graph")

    def session_config(self, current: SessionConfig) -> SessionConfig:
        update: dict[str, object] = {}
        c = self.config
        if c.threads is not None:
            update["intra_op_num_threads"] = physical_cores() if c.threads == "cores" else c.threads
        if c.inter_op_threads is not None:
            update["inter_op_num_threads"] = c.inter_op_threads
        if c.execution_mode is not None:
            update["execution_mode"] = c.execution_mode
        if c.spinning is not None:
            update["allow_spinning"] = c.spinning
        return current.model_copy(update=update)
