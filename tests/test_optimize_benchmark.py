from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from bladeflow.contract import SessionConfig, Tolerance
from bladeflow.demo import build_demo_model
from bladeflow.errors import UserInputError
from tasks.benchmark.latency import BenchmarkSettings, benchmark
from tasks.convert.onnx_source import load_onnx_source
from tasks.optimize.base import PASSES, get_pass
from tasks.optimize.recipes import BASELINE, build_candidate, parse_passes, resolve_recipes
from tasks.validate.accuracy import REFERENCE_SESSION, compare, predict
from tasks.validate.data import synthesize
from tests import models


def test_every_registered_pass_imports_with_a_unique_key():
    get_pass("ort_graph")  # loads the built-in passes
    assert PASSES, "no pass registered"
    for key, cls in PASSES.items():
        assert cls.name == key
        assert cls.__doc__ and cls.__doc__.strip(), f"{key} needs a one-line docstring"
        cls()  # default config is valid


def test_ort_graph_fuses_the_demo_and_keeps_its_outputs(tmp_path: Path):
    # setup
    model = load_onnx_source(
        build_demo_model(tmp_path / "demo.onnx", features=16, hidden=32, outputs=8),
        tmp_path / "conv",
    )
    recipe = parse_passes("ort_graph:level=extended")[0]
    data = synthesize(model.signature, samples=8)
    # execute
    cand = build_candidate(recipe, model, tmp_path / "cands")
    # assert
    before = len(onnx.load(model.path).graph.node)
    after = len(onnx.load(cand.artifact.path).graph.node)
    assert after < before, f"expected LayerNorm/GELU fusion to remove nodes ({before} -> {after})"
    assert cand.session.graph_optimization_level == "disable"
    assert (Path(cand.artifact.path).parent / "pass_config.json").is_file()
    assert cand.artifact.provenance.parent_sha256 == model.sha256
    ref = predict(model, REFERENCE_SESSION, data)
    got = predict(cand.artifact, cand.session, data)
    assert compare(cand.name, got, ref, Tolerance(), True).passed


def test_baseline_is_always_a_candidate():
    names = [r.name for r in resolve_recipes("cpu")]
    assert names[0] == BASELINE and len(names) > 1
    assert resolve_recipes("cpu", "ort_graph:level=all")[0].name == BASELINE


@pytest.mark.parametrize(
    "spec", ["nope", "ort_graph:level", "ort_graph:level=fastest", "ort_graph:speed=1"]
)
def test_bad_pass_specs_are_refused(spec: str):
    with pytest.raises(UserInputError):
        parse_passes(spec)


def test_benchmark_interleaves_models_and_skips_impossible_batches(tmp_path: Path):
    # setup
    dyn = load_onnx_source(models.mlp(tmp_path / "dyn.onnx"), tmp_path / "a")
    fixed = load_onnx_source(models.mlp(tmp_path / "fixed.onnx", batch=1), tmp_path / "b")
    data = synthesize(dyn.signature, samples=4)
    settings = BenchmarkSettings(warmup=1, rounds=2, iterations=3)
    # execute
    rep = benchmark(
        {"a": (dyn, SessionConfig()), "b": (dyn, SessionConfig(allow_spinning=False))},
        data,
        [1, 4],
        settings,
    )
    rep_fixed = benchmark({"f": (fixed, SessionConfig())}, data, [1, 8], settings)
    # assert
    assert set(rep.models) == {"a", "b"}
    for per in rep.models.values():
        assert set(per) == {1, 4}
        assert all(s.iterations == 6 and 0 < s.p50_ms <= s.p99_ms for s in per.values())
        assert per[4].throughput > 0
    assert set(rep_fixed.models["f"]) == {1}
    assert "fixed at 1" in rep_fixed.skipped_batch_sizes[8]
    assert rep.shapes == {"x": [8]}
    assert np.isfinite(rep.models["a"][1].mean_ms)
