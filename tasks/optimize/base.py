"""The optimization pass interface and the registry of passes.

A pass takes a model artifact and a working folder and returns a new artifact, written next to the
resolved configuration that produced it. Passes register themselves by ``name`` when their module
is imported; :func:`get_pass` builds one from a name and a config mapping.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bladeflow.contract import ModelArtifact, PassRecord, Provenance, SessionConfig
from bladeflow.environment import tool_versions
from bladeflow.errors import UserInputError
from bladeflow.hashing import sha256_path

PASSES: dict[str, type[OptimizationPass]] = {}


class PassConfig(BaseModel):
    """Base for pass configs: unknown keys are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizationPass(ABC):
    """One optimization step. Subclasses set ``name`` and ``config_cls`` and implement ``apply``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]] = PassConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            if cls.name in PASSES and PASSES[cls.name] is not cls:
                raise TypeError(f"two optimization passes are named {cls.name!r}")
            PASSES[cls.name] = cls

    def __init__(self, config: PassConfig | dict[str, Any] | None = None):
        if isinstance(config, PassConfig):
            self.config = config
        else:
            try:
                self.config = self.config_cls(**(config or {}))
            except ValidationError as exc:
                raise UserInputError(f"invalid config for pass {self.name!r}: {exc}") from exc

    @abstractmethod
    def apply(self, source: Path, output: Path) -> None:
        """Read the ONNX model at ``source`` and write the optimized model to ``output``."""

    def session_config(self, current: SessionConfig) -> SessionConfig:
        """How the pass's output must be run (e.g. no re-optimization at load)."""
        return current

    def record(self) -> PassRecord:
        return PassRecord(name=self.name, config=self.config.model_dump(mode="json"))

    def run(self, model: ModelArtifact, workdir: Path) -> ModelArtifact:
        """Apply the pass to ``model``; output and ``pass_config.json`` go to ``workdir``."""
        workdir.mkdir(parents=True, exist_ok=True)
        output = workdir / "model.onnx"
        started = time.perf_counter()
        self.apply(Path(model.path), output)
        record = self.record()
        (workdir / "pass_config.json").write_text(
            json.dumps(
                {**record.model_dump(), "input_sha256": model.sha256,
                 "elapsed_s": round(time.perf_counter() - started, 3)},
                indent=2,
            )
        )
        return ModelArtifact(
            path=str(output),
            format="onnx",
            sha256=sha256_path(output),
            size_bytes=output.stat().st_size,
            signature=model.signature,
            provenance=Provenance(
                source=model.provenance.source, parent_sha256=model.sha256, step=record,
                tool_versions=tool_versions(),
            ),
        )


def get_pass(name: str, config: dict[str, Any] | None = None) -> OptimizationPass:
    """Build the registered pass ``name`` with ``config``."""
    _load_builtin_passes()
    try:
        cls = PASSES[name]
    except KeyError:
        raise UserInputError(
            f"unknown optimization pass {name!r}; available: {', '.join(sorted(PASSES))}"
        ) from None
    return cls(config)


def _load_builtin_passes() -> None:
    # Importing the modules registers their passes; kept here so `base` has no import cycle.
    from tasks.optimize import ort_graph  # noqa: F401
