"""Twin candidates: one graph under session settings that cannot change its arithmetic.

``fused`` and ``fused-tuned`` are the same ONNX file; the tuned one only runs it with other
thread and spinning settings. ONNX Runtime's CPU kernels split work across threads by output
blocks (GEMM by rows/columns, attention by batch x head, normalizations by row), so each output
element is computed the same way whatever the thread count. The gate then need not run the whole
validation set twice: the twin is run beside its leader on a probe of the data and, when every
output is bitwise equal there, it inherits the leader's verdict. When anything differs it is
validated in full like any other candidate: the shortcut is checked, never assumed.
"""

from __future__ import annotations

import numpy as np

from bladeflow.core.contract import Candidate
from bladeflow.tasks.validate.accuracy import predict
from bladeflow.tasks.validate.data import Dataset, sample_count

PROBE_ROWS = 48  # two evaluation batches of 32 (the second one partial): both code paths


def twin_key(c: Candidate) -> tuple[str, str, tuple[str, ...], str]:
    """Candidates with equal keys compute the same numbers (only threads/spinning differ)."""
    s = c.session
    options = repr(sorted((k, sorted(v.items())) for k, v in s.provider_options.items()))
    return (c.artifact.sha256, s.graph_optimization_level, tuple(s.providers), options)


def probe(data: Dataset, rows: int = PROBE_ROWS) -> Dataset:
    """The first ``rows`` samples (all of them when there are fewer)."""
    n = min(rows, sample_count(data))
    return {k: v[:n] for k, v in data.items()}


def same_outputs(leader: Candidate, twin: Candidate, data: Dataset) -> bool:
    """True when ``twin`` gives bitwise the same outputs as ``leader`` on ``data``."""
    a = predict(leader.artifact, leader.session, data)
    b = predict(twin.artifact, twin.session, data)
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
        for k in a
    )
