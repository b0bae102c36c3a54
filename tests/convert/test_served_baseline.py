"""Source runners expose the path a service runs: Keras as a traced graph, PyTorch under
inference_mode with the candidates' threads; the served path is timed only if it matches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import SessionConfig
from bladeflow.tasks.benchmark.baseline import (
    SOURCE,
    SOURCE_EAGER,
    candidate_threads,
    plan_source,
    settle,
    torch_threads_kept,
)
from bladeflow.tasks.benchmark.latency import BenchmarkSettings, benchmark
from bladeflow.tasks.convert.base import EAGER, SERVED, SourcePath, timing_paths
from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source, open_source_runner


def _keras_conv(path: Path) -> Path:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    image = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    keras.Model(image, out).save(path)
    return path


@pytest.fixture(scope="module")
def keras_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    root = tmp_path_factory.mktemp("keras-baseline")
    src = str(_keras_conv(root / "conv.keras"))
    artifact = convert_source(src, root / "converted", ConvertOptions())
    return src, artifact


@pytest.mark.tf
def test_keras_runner_times_a_graph_traced_once_that_equals_eager(keras_source):
    import tensorflow as tf

    # setup
    src, artifact = keras_source
    runner = open_source_runner(src, ConvertOptions(), artifact)
    rng = np.random.default_rng(0)
    one = {"image": rng.standard_normal((1, 12, 12, 3)).astype(np.float32)}
    five = {"image": rng.standard_normal((5, 12, 12, 3)).astype(np.float32)}
    # execute
    paths = timing_paths(runner)
    served, eager = paths
    outs = [(served.call(f), eager.call(f), runner(f)) for f in (one, five, one)]
    # assert: served is a graph ConcreteFunction, traced once for every batch size
    assert [p.kind for p in paths] == [SERVED, EAGER]
    assert "tf.function" in served.description and "eager" in eager.description
    graph = runner.served
    assert isinstance(graph.concrete, tf.types.experimental.ConcreteFunction)
    assert graph.concrete.graph is not None and graph.concrete.graph.building_function
    assert graph.function.experimental_get_tracing_count() == 1
    # assert: the reference is the eager call, and the graph equals it within fp32 noise
    for s, e, ref in outs:
        assert set(s) == set(ref) == {"probs"}
        np.testing.assert_array_equal(e["probs"], ref["probs"])
        np.testing.assert_allclose(s["probs"], ref["probs"], rtol=1e-5, atol=1e-6)
    assert outs[1][0]["probs"].shape == (5, 3)


@pytest.mark.tf
def test_keras_benchmark_times_both_paths_and_states_the_baseline(keras_source):
    # setup
    src, artifact = keras_source
    runner = open_source_runner(src, ConvertOptions(), artifact)
    data = {"image": np.random.default_rng(1).standard_normal((6, 12, 12, 3)).astype(np.float32)}
    plan = plan_source(runner, data, threads=2)
    # execute
    report = benchmark(
        {"baseline": (artifact, SessionConfig())},
        data,
        [1, 4],
        BenchmarkSettings(warmup=1, rounds=2, iterations=3),
        runners=plan.runners,
    )
    settled = settle(report, plan)
    # assert: both paths were timed in the same rounds, and `source` is the faster at each batch
    assert set(plan.runners) == {SOURCE, SOURCE_EAGER} and not plan.note
    assert max(plan.checked.values()) < 1e-5
    base = settled.baseline
    assert base is not None and "tf.function" in base.source and "model(x" in base.eager
    for bs in (1, 4):
        graph, eager = report.models[SOURCE][bs], report.models[SOURCE_EAGER][bs]
        assert settled.models[SOURCE][bs].p50_ms == min(graph.p50_ms, eager.p50_ms)
        assert base.eager_p50_ms[bs] == eager.p50_ms and base.served_p50_ms[bs] == graph.p50_ms
        assert (bs in base.eager_faster) == (eager.p50_ms < graph.p50_ms)
    assert "source-eager" in base.text() and base.source in base.text()


@pytest.mark.tf
def test_savedmodel_signature_is_the_served_path(tmp_path: Path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    # setup
    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="x")
    model = keras.Model(x, keras.layers.Dense(2, name="y")(x))
    model.export(str(tmp_path / "sm"), verbose=False)
    artifact = convert_source(str(tmp_path / "sm"), tmp_path / "out", ConvertOptions())
    # execute
    runner = open_source_runner(str(tmp_path / "sm"), ConvertOptions(), artifact)
    paths = timing_paths(runner, threads=2)
    # assert: one path (a signature is already a graph function), stated as such
    assert [p.kind for p in paths] == [SERVED]
    assert "signature 'serving_default'" in paths[0].description
    assert "graph" in paths[0].description


class _Differs:
    """A runner whose served path computes something else than its eager reference."""

    name = "fake"

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": feeds["x"] * 2.0}

    def timing_paths(self, threads: int | None = None) -> list[SourcePath]:
        def wrong(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"y": feeds["x"] * 2.0 + 1e-3}

        return [SourcePath(SERVED, "fast graph", wrong), SourcePath(EAGER, "eager", self)]


def test_served_path_that_differs_from_the_reference_is_not_timed():
    # setup
    data = {"x": np.ones((3, 4), np.float32)}
    # execute
    plan = plan_source(_Differs(), data)
    # assert
    assert list(plan.runners) == [SOURCE] and plan.source == "eager"
    assert "fast graph" in plan.note and "differs from the eager call's by up to 0.001" in plan.note


class _Untraceable(_Differs):
    """A runner whose served path cannot be built (e.g. a layer that cannot be traced)."""

    def timing_paths(self, threads: int | None = None) -> list[SourcePath]:
        def broken(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            raise ValueError("cannot trace layer 'odd'\nmore detail")

        return [SourcePath(SERVED, "graph", broken), SourcePath(EAGER, "eager", self)]


def test_served_path_that_fails_leaves_eager_as_the_stated_baseline():
    plan = plan_source(_Untraceable(), {"x": np.ones((2, 4), np.float32)})
    assert list(plan.runners) == [SOURCE] and plan.source == "eager"
    assert plan.note.endswith("(ValueError: cannot trace layer 'odd')")


def test_candidate_threads_resolve_ort_default_to_physical_cores():
    sessions = [SessionConfig(), SessionConfig(intra_op_num_threads=1)]
    assert candidate_threads(sessions, default=3) == 3
    assert candidate_threads([SessionConfig(intra_op_num_threads=4)], default=2) == 4
    assert candidate_threads([], default=2) == 2


@pytest.mark.torch
def test_torch_runner_times_under_inference_mode_with_the_candidates_threads():
    torch = pytest.importorskip("torch")
    from bladeflow.tasks.convert.torch_common import TorchRunner

    seen: list[tuple[bool, int]] = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((torch.is_inference_mode_enabled(), torch.get_num_threads()))
            return self.lin(x)

    # setup
    module = Probe().eval()
    runner = TorchRunner(module, ["x"], ["y"])
    feeds = {"x": np.ones((2, 4), np.float32)}
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    # execute
    with torch_threads_kept():
        (path,) = timing_paths(runner, threads=wanted)
        out = path.call(feeds)
        during = torch.get_num_threads()
    # assert: inference_mode, the asked thread count while timing, restored afterwards
    assert path.kind == SERVED and "inference_mode" in path.description
    assert f"{wanted} thread" in path.description
    assert seen == [(True, wanted)] and during == wanted
    assert torch.get_num_threads() == before
    with torch.inference_mode():
        expected = module.lin(torch.ones(2, 4)).numpy()
    np.testing.assert_array_equal(out["y"], expected)
