"""The release plan: stages (traffic share, how long, how much traffic) and gate thresholds.

A pydantic model, so the Prefect UI renders the plan as a form and a plan file (JSON/YAML) is
validated with messages that name the field. Presets: ``default`` (minutes per stage, for
production) and ``fast`` (seconds, for demos and tests).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from bladeflow.core.errors import UserInputError


class OnInsufficientTraffic(StrEnum):
    """What a stage does when its max duration passes without enough traffic to judge."""

    FAIL = "fail"  # roll back: an unjudged version never moves on
    HOLD = "hold"  # keep the stage (and waiting) until traffic arrives or an operator decides


class StagePlan(BaseModel):
    """One step of the rollout."""

    name: str = Field(description="stage label, e.g. 'shadow' or 'canary-5'")
    weight: int = Field(ge=0, le=100, description="% of responses served by the new version")
    shadow_share: int = Field(
        0, ge=0, le=100, description="% of champion requests mirrored to the new version"
    )
    min_duration_s: float = Field(ge=0, description="the stage lasts at least this long")
    max_duration_s: float = Field(gt=0, description="judge or give up after this long")
    min_requests: int = Field(
        ge=1, description="new-version requests (shadow: mirrored requests) needed to judge"
    )

    @model_validator(mode="after")
    def _check(self) -> StagePlan:
        if self.max_duration_s < self.min_duration_s:
            raise ValueError(
                f"stage {self.name!r}: max_duration_s ({self.max_duration_s}) must be >= "
                f"min_duration_s ({self.min_duration_s})"
            )
        if self.weight == 0 and self.shadow_share == 0:
            raise ValueError(
                f"stage {self.name!r} sends the new version no traffic: give it a weight or a "
                "shadow_share"
            )
        return self


class GatePolicy(BaseModel):
    """Thresholds every stage is judged by (new version vs. champion, same time window)."""

    max_error_rate_delta: float = Field(
        0.01, ge=0, le=1, description="canary 5xx share may exceed the champion's by this much"
    )
    max_rejected_rate_delta: float = Field(
        0.05,
        ge=0,
        le=1,
        description="canary 4xx share (429 aside) may exceed the champion's by this much: both "
        "get the same inputs, so a version that refuses more of them is broken",
    )
    p99_epsilon: float = Field(
        0.25, ge=0, description="canary p99 <= champion p99 * (1 + epsilon) + p99_slack_ms"
    )
    p99_slack_ms: float = Field(
        2.0, ge=0, description="absolute allowance: histogram buckets are coarse at small values"
    )
    min_latency_samples: int = Field(
        100,
        ge=1,
        description="canary latency samples needed before p99 is compared (with fewer, p99 is "
        "just the slowest request)",
    )
    min_agreement: float = Field(
        0.99, ge=0, le=1, description="shadow outputs that must agree with the champion's"
    )


class ReleasePlan(BaseModel):
    """Stages, gates and timings of one staged gray release."""

    stages: list[StagePlan] = Field(default_factory=lambda: default_stages())
    gates: GatePolicy = Field(default_factory=GatePolicy)
    on_insufficient_traffic: OnInsufficientTraffic = OnInsufficientTraffic.FAIL
    poll_interval_s: float = Field(5.0, gt=0, description="seconds between metric scrapes")
    sync_timeout_s: float = Field(
        120.0, gt=0, description="how long serving may take to load/apply a registry change"
    )
    lease_ttl_s: float = Field(
        120.0, gt=0, description="a release that stops renewing its lease this long is dead"
    )
    approval_timeout_s: int = Field(86400, ge=1, description="how long to wait for approval")
    approval_poll_s: int = Field(10, ge=1, description="how often a paused run checks")

    @model_validator(mode="after")
    def _check(self) -> ReleasePlan:
        if not self.stages:
            raise ValueError("a plan needs at least one stage")
        weights = [s.weight for s in self.stages]
        if weights != sorted(weights):
            raise ValueError(f"stage weights must not decrease, got {weights}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.lease_ttl_s < 3 * self.poll_interval_s:
            raise ValueError("lease_ttl_s must be at least 3 x poll_interval_s")
        return self


_DEFAULT_STAGES: tuple[StagePlan, ...] = (
    StagePlan(
        name="shadow",
        weight=0,
        shadow_share=20,
        min_duration_s=300,
        max_duration_s=1800,
        min_requests=500,
    ),
    StagePlan(name="canary-5", weight=5, min_duration_s=600, max_duration_s=3600, min_requests=500),
    StagePlan(
        name="canary-25", weight=25, min_duration_s=600, max_duration_s=3600, min_requests=1000
    ),
    StagePlan(
        name="canary-50", weight=50, min_duration_s=600, max_duration_s=3600, min_requests=1000
    ),
    StagePlan(name="full", weight=100, min_duration_s=300, max_duration_s=1800, min_requests=1000),
)


def fast_plan(seconds: float = 5.0, requests: int = 20) -> ReleasePlan:
    """The default stages with short durations: demos and tests."""
    stages = [
        s.model_copy(
            update={
                "min_duration_s": seconds,
                "max_duration_s": seconds * 6,
                "min_requests": requests,
                "shadow_share": 100 if s.weight == 0 else 0,
            }
        )
        for s in _DEFAULT_STAGES
    ]
    return ReleasePlan(
        stages=stages,
        poll_interval_s=max(0.2, seconds / 10),
        sync_timeout_s=60,
        lease_ttl_s=max(10.0, seconds * 3),
        approval_poll_s=1,
    )


def default_stages() -> list[StagePlan]:
    """shadow -> 5% -> 25% -> 50% -> 100% with production durations."""
    return [s.model_copy() for s in _DEFAULT_STAGES]


PRESETS: dict[str, Callable[[], ReleasePlan]] = {"default": ReleasePlan, "fast": fast_plan}


def load_plan(spec: str | None) -> ReleasePlan:
    """A plan from a preset name (``default``, ``fast``) or a ``.json``/``.yaml`` file."""
    if spec is None or spec in PRESETS:
        return PRESETS[spec or "default"]()
    path = Path(spec)
    if not path.is_file():
        raise UserInputError(
            f"--plan {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
        )
    text = path.read_text()
    try:
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            try:
                data: Any = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(str(exc)) from None
        else:
            data = json.loads(text)
        return ReleasePlan.model_validate(data or {})
    except (ValueError, ValidationError) as exc:
        raise UserInputError(f"plan file {path} is not a valid release plan: {exc}") from None
