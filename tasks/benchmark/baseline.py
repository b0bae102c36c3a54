"""The source model's baseline: its framework the way a production service runs it.

A speedup is only honest against the path a service runs. Calling a Keras model eagerly
(``model(x)``) pays Python and op-dispatch costs per layer that no TensorFlow service pays (it
runs a SavedModel signature: a graph), so a speedup against it misleads. Each source runner says
which paths it has (``bladeflow.tasks.convert.base.timing_paths``): the served one first, and an
eager one where that differs. Both are timed in the same interleaved rounds (labels ``source`` and
``source-eager``) and ``source`` is, at each batch size, the faster of the two.

The reference outputs stay the eager call's (the model's true output). The served path is timed
only after its outputs matched the reference's within fp32 noise on the validation data; if they
do not, the eager path alone is the baseline and the report says why.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bladeflow.core.contract import BenchmarkReport, SessionConfig, SourceBaseline
from bladeflow.tasks.convert.base import EAGER, SERVED, SourceRunner, timing_paths
from bladeflow.tasks.register.run_report import SOURCE, SOURCE_EAGER
from bladeflow.tasks.validate.data import Dataset, sample_count, tile

# Served (graph) and eager results of the same fp32 model differ by reassociation only: graph
# rewrites fuse and reorder ops. Beyond this they compute something else.
ATOL = 1e-5
RTOL = 1e-4
_CHECK_ROWS = 8


@dataclass
class SourcePlan:
    """What to time for the source: label -> call, and how to state the baseline afterwards."""

    runners: dict[str, Callable[[Dataset], Any]]
    source: str
    eager: str = ""
    threads: int | None = None
    note: str = ""
    checked: dict[str, float] = field(default_factory=dict)  # output -> max abs diff


def candidate_threads(sessions: Iterable[SessionConfig], default: int) -> int:
    """The intra-op threads the ONNX candidates run with (the most of any; 0 means ONNX
    Runtime's default, ``default``: one per physical core), to give the source the same."""
    counts = [s.intra_op_num_threads or default for s in sessions]
    return max(counts, default=default)


def plan_source(runner: SourceRunner, data: Dataset, threads: int | None = None) -> SourcePlan:
    """The calls to time for ``runner``; the served path only if it matches the reference."""
    paths = timing_paths(runner, threads)
    served = next((p for p in paths if p.kind == SERVED), None)
    eager = next((p for p in paths if p.kind == EAGER), None)
    if served is None:  # a runner that offers only an eager path
        only = eager or paths[0]
        return SourcePlan({SOURCE: only.call}, only.description, threads=threads)
    if eager is None:
        return SourcePlan({SOURCE: served.call}, served.description, threads=threads)
    feeds = tile(data, min(_CHECK_ROWS, sample_count(data)))
    reference = runner(feeds)  # the eager call: its failure is the model's, not the path's
    try:
        why, diffs = mismatch(served.call(feeds), reference)
    except Exception as exc:  # noqa: BLE001 -- stated in the baseline and logged, not hidden
        # Any framework error while tracing/running the served path (e.g. a layer that cannot
        # be traced): the eager path still measures the source, and the report says why.
        text = str(exc).strip().splitlines()
        why, diffs = f"it failed ({type(exc).__name__}: {text[0] if text else ''})", {}
    if why:
        return SourcePlan(
            {SOURCE: eager.call},
            eager.description,
            threads=threads,
            note=f"the served path ({served.description}) was not timed: {why}",
        )
    return SourcePlan(
        {SOURCE: served.call, SOURCE_EAGER: eager.call},
        served.description,
        eager=eager.description,
        threads=threads,
        checked=diffs,
    )


def mismatch(
    served: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> tuple[str, dict[str, float]]:
    """Why the served outputs are not the reference's within fp32 noise ("" when they are), and
    the max abs difference per output."""
    if set(served) != set(reference):
        return f"its outputs {sorted(served)} differ from the model's {sorted(reference)}", {}
    diffs: dict[str, float] = {}
    for name, ref in reference.items():
        got = np.asarray(served[name])
        if got.shape != ref.shape:
            return f"output {name!r} has shape {got.shape}, the model's {ref.shape}", diffs
        if not np.issubdtype(ref.dtype, np.number):
            if not np.array_equal(got, ref):
                return f"output {name!r} differs from the model's", diffs
            diffs[name] = 0.0
            continue
        a, b = got.astype(np.float64), ref.astype(np.float64)
        diffs[name] = float(np.max(np.abs(a - b))) if a.size else 0.0
        if not np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True):
            return (
                f"output {name!r} differs from the eager call's by up to {diffs[name]:.3g} "
                f"(fp32 noise is within {ATOL:g} + {RTOL:g}*|x|)"
            ), diffs
    return "", diffs


def settle(report: BenchmarkReport, plan: SourcePlan) -> BenchmarkReport:
    """``source`` becomes the faster of the served and eager paths at each batch size, and the
    report states what it is (``BenchmarkReport.baseline``)."""
    served = report.models.get(SOURCE, {})
    eager = report.models.get(SOURCE_EAGER, {})
    source = dict(served)
    faster = sorted(b for b, st in eager.items() if b in served and st.p50_ms < served[b].p50_ms)
    for b in faster:
        source[b] = eager[b]
    baseline = SourceBaseline(
        source=plan.source,
        eager=plan.eager,
        eager_faster=faster,
        served_p50_ms={b: st.p50_ms for b, st in served.items()},
        eager_p50_ms={b: st.p50_ms for b, st in eager.items()},
        threads=plan.threads,
        note=plan.note,
    )
    models = {**report.models, SOURCE: source} if served else report.models
    return report.model_copy(update={"models": models, "baseline": baseline})


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore PyTorch's process-wide thread count after timing changed it (if torch is loaded)."""
    torch: Any = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and before and torch.get_num_threads() != before:
            torch.set_num_threads(before)
