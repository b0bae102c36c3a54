"""The search is a tournament: a candidate that raises while it is built, validated or timed is
FAILED with its reason; the rest go on and the run registers. Faults are injected as passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bladeflow.core import registry
from bladeflow.core.params import OptimizeParams
from bladeflow.core.settings import Settings
from bladeflow.flows.optimize import optimize_flow
from bladeflow.tasks.optimize.base import OptimizationPass
from tests import models

pytestmark = pytest.mark.usefixtures("prefect_harness")
SAMPLES = 20


class FailsToBuild(OptimizationPass):
    """Raises while building (e.g. ONNX's version converter on a legacy graph)."""

    name = "test_fails_to_build"

    def apply(self, source: Path, output: Path) -> None:
        raise RuntimeError("injected: the pass broke")


class FailsToValidate(OptimizationPass):
    """Writes a graph that wants an input the model never had (ORT's "Required inputs missing")."""

    name = "test_fails_to_validate"

    def apply(self, source: Path, output: Path) -> None:
        m = onnx.load(str(source))
        m.graph.input.append(helper.make_tensor_value_info("x_SHAPE", TensorProto.FLOAT, [1]))
        y = m.graph.output[0].name
        m.graph.node.append(helper.make_node("Mul", [y + "_raw", "x_SHAPE"], [y]))
        for node in m.graph.node[:-1]:
            node.output[:] = [y + "_raw" if o == y else o for o in node.output]
        onnx.save(m, str(output))


class FailsToBenchmark(OptimizationPass):
    """Runs at the validation batch (SAMPLES rows) only: fixed-size Reshape, fails at batch 1."""

    name = "test_fails_to_benchmark"

    def apply(self, source: Path, output: Path) -> None:
        m = onnx.load(str(source))
        y = m.graph.output[0].name
        shape = numpy_helper.from_array(np.array([SAMPLES, -1], dtype=np.int64), "fixed_shape")
        m.graph.initializer.append(shape)
        for node in m.graph.node:
            node.output[:] = [y + "_raw" if o == y else o for o in node.output]
        m.graph.node.append(helper.make_node("Reshape", [y + "_raw", "fixed_shape"], [y]))
        onnx.save(m, str(output))


@pytest.mark.parametrize(
    ("recipe", "phase"),
    [
        ("test_fails_to_build", "pass failed: RuntimeError: injected: the pass broke"),
        ("test_fails_to_validate", "validation failed:"),
        ("test_fails_to_benchmark", "benchmark failed at batch 1"),
    ],
)
def test_a_failing_candidate_is_rejected_with_its_reason_and_the_run_registers(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int], recipe: str, phase: str
):
    # setup
    src = models.mlp(tmp_path / "mlp.onnx", features=8)
    data = tmp_path / "val.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((SAMPLES, 8)).astype(np.float32))
    params = OptimizeParams(
        source=str(src),
        name="isolated",
        data=str(data),
        batch_sizes=[1, 4],
        bench=bench_fast,
        passes=f"{recipe},ort_graph:level=basic",
    )
    # execute
    result = optimize_flow(params)
    # assert: the run registered one of the others
    assert result.version == "1" and result.candidate in {"baseline", "ort_graph-levelbasic"}
    # assert: the failing candidate is FAILED with the phase's reason, in the MLflow records
    from mlflow import MlflowClient

    c = MlflowClient(settings.tracking_uri)
    runs = c.search_runs(
        [c.get_run(result.run_id).info.experiment_id],
        filter_string=f"tags.`{registry.RUN_TAG_CANDIDATE}` = '{recipe}'",
    )
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags[registry.RUN_TAG_GATE] == "rejected" and phase in tags[registry.RUN_TAG_REASON]
    table = c.download_artifacts(result.run_id, "reports/candidates.md", str(tmp_path))
    assert phase in Path(table).read_text()


def test_a_baseline_that_cannot_run_ends_the_run_with_a_reason(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int]
):
    # setup: a source that runs at 20 rows only; the data has 20 rows, the benchmark wants 1
    from bladeflow.core.errors import BladeflowError

    src = models.mlp(tmp_path / "mlp.onnx", features=8)
    broken = tmp_path / "fixed20.onnx"
    FailsToBenchmark().apply(src, broken)
    data = tmp_path / "val.npz"
    np.savez(data, x=np.zeros((SAMPLES, 8), dtype=np.float32))
    params = OptimizeParams(
        source=str(broken), name="nobase", data=str(data), batch_sizes=[1], bench=bench_fast
    )
    # execute
    with pytest.raises(BladeflowError) as info:
        optimize_flow(params)
    # assert: a user-facing error (exit 2 or 3) that says what broke, and nothing registered
    assert info.value.exit_code in {2, 3}, info.value
    assert "Reshape" in str(info.value) or "reshape" in str(info.value).lower(), info.value
    from mlflow import MlflowClient

    assert MlflowClient(settings.tracking_uri).search_registered_models() == []
