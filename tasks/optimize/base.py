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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bladeflow.core.contract import (
    DataRef,
    ModelArtifact,
    PassRecord,
    Provenance,
    SessionConfig,
    Tolerance,
)
from bladeflow.core.environment import tool_versions
from bladeflow.core.errors import UserInputError
from bladeflow.core.hashing import sha256_path
from bladeflow.core.policy import TolerancePolicy, policy_from_tolerance

PASSES: dict[str, type[OptimizationPass]] = {}


class PassNotApplicable(UserInputError):
    """A pass cannot run here (no GPU, no package, no validation data): skipped with a reason."""


class PassContext(BaseModel):
    """What accuracy-aware passes need besides the model: data, reference outputs and the gate.

    Attributes:
        data: The validation inputs (``.npz`` by input name).
        reference_path: ``.npz`` of the source model's outputs on ``data`` (the gate's reference).
        tolerance: The elementwise gate (used when ``policy`` is None; older callers).
        policy: The gate's policy every candidate must pass (the run's accuracy budget):
            accuracy recovery searches against exactly this.
        time_budget_s: Wall-clock budget for a pass's search (e.g. accuracy recovery).
    """

    model_config = ConfigDict(frozen=True)

    data: DataRef
    reference_path: str
    tolerance: Tolerance = Field(default_factory=Tolerance)
    policy: TolerancePolicy | None = None
    time_budget_s: float = 300.0

    def gate_policy(self) -> TolerancePolicy:
        """The policy the final gate applies: ``policy``, else the one ``tolerance`` stands for."""
        return self.policy or policy_from_tolerance(self.tolerance)


class PassConfig(BaseModel):
    """Base for pass configs: unknown keys are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizationPass(ABC):
    """One optimization step. Subclasses set ``name`` and ``config_cls`` and implement ``apply``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]] = PassConfig
    uses_context: ClassVar[bool] = False
    """True for passes whose output depends on the PassContext (data, reference, tolerance)."""
    changes_graph: ClassVar[bool] = True
    """False for passes that only change how the model is run (their ``apply`` is never called)."""

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

    @classmethod
    def applicable(cls, hardware: dict[str, Any]) -> str | None:
        """None when the pass can run on ``hardware`` (bladeflow.core.environment), else why not."""
        return None

    def model_skip_reason(self, op_types: set[str]) -> str | None:
        """None when the pass has work to do on a graph with these op types, else why not."""
        return None

    @abstractmethod
    def apply(self, source: Path, output: Path) -> None:
        """Read the ONNX model at ``source`` and write the optimized model to ``output``."""

    def apply_in_context(self, source: Path, output: Path, context: PassContext | None) -> None:
        """Like :meth:`apply`; passes that need validation data (accuracy recovery) override it."""
        self.apply(source, output)

    def details(self) -> dict[str, Any]:
        """What the pass found while running (fusion counts, nodes kept in fp32), for the record."""
        return {}

    def session_config(self, current: SessionConfig) -> SessionConfig:
        """How the pass's output must be run (e.g. no re-optimization at load)."""
        return current

    def record(self) -> PassRecord:
        return PassRecord(name=self.name, config=self.config.model_dump(mode="json"))

    def run(
        self, model: ModelArtifact, workdir: Path, context: PassContext | None = None
    ) -> ModelArtifact:
        """Apply the pass to ``model``; output and ``pass_config.json`` go to ``workdir``.

        When ``workdir`` already holds this pass's output for the same input and config (e.g. the
        same chain built for several session variants), that output is reused.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        output = workdir / "model.onnx"
        record = self.record()
        config_file = workdir / "pass_config.json"
        if not _reusable(config_file, output, record, model.sha256):
            started = time.perf_counter()
            self.apply_in_context(Path(model.path), output, context)
            config_file.write_text(
                json.dumps(
                    {
                        **record.model_dump(),
                        "input_sha256": model.sha256,
                        "elapsed_s": round(time.perf_counter() - started, 3),
                        "details": self.details(),
                    },
                    indent=2,
                    default=str,
                )
            )
        return ModelArtifact(
            path=str(output),
            format="onnx",
            sha256=sha256_path(output),
            size_bytes=output.stat().st_size,
            signature=model.signature,
            provenance=Provenance(
                source=model.provenance.source,
                parent_sha256=model.sha256,
                step=record,
                tool_versions=tool_versions(),
            ),
        )


def _reusable(config_file: Path, output: Path, record: PassRecord, input_sha: str) -> bool:
    if not (config_file.is_file() and output.is_file()):
        return False
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    return bool(
        saved.get("input_sha256") == input_sha
        and saved.get("name") == record.name
        and saved.get("config") == record.config
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
    from bladeflow.tasks.optimize import (  # noqa: F401
        cuda,
        fp16,
        int8_dynamic,
        int8_static,
        int8_tokenwise,
        mixed_precision,
        ort_graph,
        session,
        simplify,
        smoothquant,
        tensorrt,
        transformer_fusion,
    )


def all_passes() -> dict[str, type[OptimizationPass]]:
    """Every built-in pass by name."""
    _load_builtin_passes()
    return dict(PASSES)
