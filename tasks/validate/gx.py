"""Great Expectations 1.x, imported lazily and once: run a suite of expectations on a DataFrame.

Data checks and the accuracy gate both describe what they expect as a list of :class:`Check`
(a human name, a GX expectation class name and its arguments); :func:`run_checks` turns them into
an ExpectationSuite and runs a ValidationDefinition on an ephemeral context. The suite's result is
the verdict; :class:`SuiteResult` keeps it as JSON for the report.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import pandas as pd

# The flow validates candidates in parallel threads; the shared ephemeral context is not
# documented as thread-safe, so suites run one at a time (each takes ~0.1 s).
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Check:
    """One expectation: ``name`` is what a person reads when it fails."""

    name: str
    expectation: (
        str  # class name in great_expectations.expectations, e.g. ExpectColumnMaxToBeBetween
    )
    kwargs: dict[str, Any] = field(default_factory=dict)


class CheckOutcome(BaseModel):
    """The verdict of one expectation."""

    name: str
    expectation: str
    success: bool
    observed: str = Field("", description="what GX measured, shortened for a table")


class SuiteResult(BaseModel):
    """The verdict of a whole suite plus GX's own result document."""

    suite: str
    success: bool
    checks: list[CheckOutcome]
    gx_result: dict[str, Any] = Field(default_factory=dict, repr=False)

    @property
    def failed(self) -> list[CheckOutcome]:
        return [c for c in self.checks if not c.success]

    def failed_names(self) -> str:
        """``name [expectation] (observed ...)`` for every failed check, ``; ``-separated."""
        return "; ".join(
            f"{c.name} [{c.expectation}]" + (f" (observed {c.observed})" if c.observed else "")
            for c in self.failed
        )

    @classmethod
    def load(cls, path: Path) -> SuiteResult:
        """Read back a file written by :meth:`save`."""
        doc = json.loads(Path(path).read_text())
        return cls(
            suite=doc["suite"],
            success=doc["success"],
            checks=[CheckOutcome(**c) for c in doc["checks"]],
            gx_result=doc.get("great_expectations", {}),
        )

    def save(self, path: Path) -> Path:
        """Write GX's result document (and our summary) as JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "suite": self.suite,
            "success": self.success,
            "checks": [c.model_dump() for c in self.checks],
            "great_expectations": self.gx_result,
        }
        path.write_text(json.dumps(_jsonable(doc), indent=2, sort_keys=False))
        return path


@functools.cache
def _gx() -> Any:
    """Import great_expectations (~5 s) on first use only."""
    import great_expectations as gx

    return gx


@functools.cache
def _context() -> Any:
    """One ephemeral context per process (writes no files), progress bars off."""
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return ctx


def run_checks(frame: pd.DataFrame, checks: list[Check], suite_name: str) -> SuiteResult:
    """Run ``checks`` as one GX ExpectationSuite on ``frame`` and return the verdict.

    Raises:
        AttributeError: a check names an expectation GX does not have (our bug, not the user's).
    """
    with _LOCK:
        return _run_locked(frame, checks, suite_name)


def _run_locked(frame: pd.DataFrame, checks: list[Check], suite_name: str) -> SuiteResult:
    gx = _gx()
    import great_expectations.expectations as gxe

    ctx = _context()
    uid = uuid.uuid4().hex[:8]
    source = ctx.data_sources.add_pandas(f"bladeflow-{uid}")
    asset = source.add_dataframe_asset(f"{suite_name}-{uid}")
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{suite_name}-{uid}"))
    for i, check in enumerate(checks):
        cls = getattr(gxe, check.expectation)
        suite.add_expectation(cls(**check.kwargs, meta={"bladeflow_check": i, "name": check.name}))
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite_name}-{uid}", data=batch, suite=suite)
    )
    try:
        result = definition.run(batch_parameters={"dataframe": frame})
    finally:
        # The context lives for the process: do not let every run accumulate objects in it.
        ctx.validation_definitions.delete(definition.name)
        ctx.suites.delete(suite.name)
        ctx.data_sources.delete(source.name)
    outcomes: list[CheckOutcome | None] = [None] * len(checks)
    for res in result.results:
        idx = res.expectation_config.meta.get("bladeflow_check")
        if not isinstance(idx, int):
            continue
        outcomes[idx] = CheckOutcome(
            name=checks[idx].name,
            expectation=res.expectation_config.type,
            success=bool(res.success),
            observed=_observed(res.result or {}, res.exception_info),
        )
    done = [
        o
        if o is not None
        else CheckOutcome(
            name=c.name, expectation=c.expectation, success=False, observed="not evaluated"
        )
        for o, c in zip(outcomes, checks, strict=True)
    ]
    return SuiteResult(
        suite=suite_name,
        success=bool(result.success) and all(o.success for o in done),
        checks=done,
        gx_result=_jsonable(result.to_json_dict()),
    )


def _observed(result: dict[str, Any], exception_info: Any) -> str:
    if isinstance(exception_info, dict) and exception_info.get("raised_exception"):
        return "error: " + str(exception_info.get("exception_message", ""))[:200]
    if "observed_value" in result:
        return _short(result["observed_value"])
    if "unexpected_count" in result:
        idx = result.get("partial_unexpected_index_list") or []
        where = f" at rows {list(idx)[:5]}" if idx else ""
        return (
            f"{result['unexpected_count']}/{result.get('element_count', '?')} unexpected "
            f"({float(result.get('unexpected_percent') or 0):.3g}%){where}"
        )
    return ""


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
