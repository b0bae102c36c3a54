"""Twin candidates inherit a verdict only when their outputs are checked bitwise equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bladeflow.core.contract import Candidate, SessionConfig
from bladeflow.tasks.convert.onnx_source import load_onnx_source
from bladeflow.tasks.validate.twins import probe, same_outputs, twin_key
from tests import models


def test_thread_settings_make_a_twin_and_its_outputs_are_checked(tmp_path: Path) -> None:
    # setup: one graph under two thread settings, and another graph
    a = load_onnx_source(str(models.mlp(tmp_path / "a.onnx", features=8, seed=0)), tmp_path / "a")
    b = load_onnx_source(str(models.mlp(tmp_path / "b.onnx", features=8, seed=1)), tmp_path / "b")
    plain = Candidate(name="fused", artifact=a)
    tuned = Candidate(
        name="fused-tuned",
        artifact=a,
        session=SessionConfig(intra_op_num_threads=1, allow_spinning=False),
    )
    other = Candidate(name="other", artifact=b)
    unfused = Candidate(
        name="unfused", artifact=a, session=SessionConfig(graph_optimization_level="disable")
    )
    data = {"x": np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)}
    # execute / assert: only thread settings keep the key
    assert twin_key(plain) == twin_key(tuned)
    assert twin_key(plain) != twin_key(other) and twin_key(plain) != twin_key(unfused)
    # the probe is the first samples, and the outputs are compared, not assumed
    rows = probe(data)
    assert len(rows["x"]) == 48 and np.array_equal(rows["x"], data["x"][:48])
    assert same_outputs(plain, tuned, rows)
    assert not same_outputs(plain, other, rows)
