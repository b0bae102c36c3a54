"""String outputs (scikit-learn class labels) from conversion through the gate to the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import Tolerance
from bladeflow.core.errors import DataError
from bladeflow.core.policy import MetricLimit, TolerancePolicy
from bladeflow.core.settings import Settings
from bladeflow.tasks.validate.accuracy import compare
from bladeflow.tasks.validate.gate import accuracy_gate, error_table
from bladeflow.tasks.validate.labels import as_text
from bladeflow.tasks.validate.metrics import task_metric
from bladeflow.tasks.validate.report import RunResults, report_markdown, write_plots

CLASSES = np.array(["bird", "cat", "dog"])


def _features(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def _labels_of(x: np.ndarray) -> np.ndarray:
    return np.where(x[:, 0] > 0.3, "cat", np.where(x[:, 1] > 0, "dog", "bird"))


def _outputs(n: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    """What ONNX Runtime gives for a skl2onnx classifier: object labels, float probabilities."""
    probs = np.random.default_rng(seed).dirichlet(np.ones(3), size=n).astype(np.float32)
    return {"label": CLASSES[probs.argmax(1)].astype(object), "probabilities": probs}


def test_labels_are_compared_by_equality_and_gated_by_agreement(tmp_path: Path) -> None:
    # setup: the source gives <U labels, the candidate ORT's object labels; one label flipped
    reference = {k: as_text(v) for k, v in _outputs().items()}
    same = _outputs()
    flipped = _outputs()
    flipped["label"][3] = "cat" if flipped["label"][3] != "cat" else "dog"
    strict = TolerancePolicy.preset("fp32")
    # execute
    ok = accuracy_gate("same", same, reference, strict, synthetic_data=False, gx_dir=tmp_path)
    bad = accuracy_gate("flipped", flipped, reference, strict, synthetic_data=False)
    loose = TolerancePolicy.preset("int8").model_copy(update={"metric": None})
    loose = loose.model_copy(
        update={"default": loose.default.model_copy(update={"min_label_agreement": 0.9})}
    )
    tolerated = accuracy_gate("flipped", flipped, reference, loose, synthetic_data=False)
    # assert
    assert ok.report.passed, ok.report.reason
    assert ok.table["label.label_agree"].tolist() == [1.0] * 12
    assert "label.max_abs_error" not in ok.table  # labels have no numeric distance
    assert ok.report.outputs["label"].mean_cosine == 1.0
    assert (tmp_path / "accuracy-same.json").is_file()
    assert not bad.report.passed
    assert "label agreement 0.9167 < 1" in bad.report.reason
    assert "sample 3" in bad.report.reason
    assert any("label equals the source's" in c.name and not c.success for c in bad.suite.checks)
    assert bad.report.outputs["label"].failing_samples == 1
    assert tolerated.report.passed, tolerated.report.reason


def test_conversion_compare_reports_differing_labels() -> None:
    # setup
    reference = {k: as_text(v) for k, v in _outputs().items()}
    got = _outputs()
    got["label"][0] = "fish"
    # execute
    report = compare("conversion", got, reference, Tolerance(), synthetic_data=False)
    # assert
    assert not report.passed
    assert "1/12 samples have another label" in report.reason
    assert "'fish'" in report.reason


def test_task_metric_scores_string_labels() -> None:
    # setup
    predicted = np.array(["cat", "dog", "dog", "bird"], dtype=object)
    truth = np.array(["cat", "dog", "cat", "bird"])
    # execute / assert
    assert task_metric("accuracy", predicted, truth) == pytest.approx(0.75)
    assert 0 < task_metric("f1", predicted, truth) < 1
    with pytest.raises(DataError, match="numeric scores"):
        task_metric("auc", predicted, truth)
    with pytest.raises(DataError, match="labels are text"):
        task_metric("accuracy", np.eye(4, 3), truth)


def test_metric_limit_on_label_output_in_the_gate() -> None:
    # setup
    reference = {k: as_text(v) for k, v in _outputs().items()}
    truth = as_text(reference["label"]).copy()
    truth[:2] = "fish"  # the source itself is wrong on two samples
    policy = TolerancePolicy.preset("fp32", metric=MetricLimit(metric="accuracy"))
    # execute
    outcome = accuracy_gate("same", _outputs(), reference, policy, False, labels=truth)
    # assert
    assert outcome.report.passed, outcome.report.reason
    assert outcome.metric is not None
    assert outcome.metric.source == pytest.approx(10 / 12)


def test_report_and_plots_handle_label_outputs(tmp_path: Path) -> None:
    # setup
    reference = {k: as_text(v) for k, v in _outputs().items()}
    outcome = accuracy_gate("same", _outputs(), reference, TolerancePolicy(), False)
    results = RunResults(
        name="clf", source="clf.skops", synthetic_data=False, accuracy={"x": outcome}
    )
    # execute
    md = report_markdown(results)
    plots = write_plots(tmp_path, results)
    # assert
    assert "label agreement" in md
    row = next(line for line in md.splitlines() if line.startswith("| label |"))
    assert row.rstrip().endswith("| 1.0000 |")
    assert [p.name for p in plots] == ["errors-probabilities.png"]


def test_error_table_shape_mismatch_on_labels_is_reported() -> None:
    # setup
    reference = {"label": np.array(["a", "b"])}
    # execute / assert
    with pytest.raises(ValueError, match="shape"):
        error_table({"label": np.array(["a", "b", "c"])}, reference, TolerancePolicy())


@pytest.mark.parametrize("forest", [False, True], ids=["logreg", "forest"])
def test_skops_string_label_classifier_converts_and_verifies_labels(
    tmp_path: Path, forest: bool
) -> None:
    # setup
    import json

    import onnx

    from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source

    src = _skops_classifier(tmp_path, forest)
    work = tmp_path / "converted"
    # execute
    model = convert_source(str(src), work, ConvertOptions())
    # assert: labels verified by equality against scikit-learn; one default-domain opset
    outputs = {o.name: o.dtype for o in model.signature.outputs}
    assert outputs == {"label": "object", "probabilities": "float32"}
    verified = json.loads((work / "convert_config.json").read_text())["verification"]["outputs"]
    assert verified["label"]["failing_samples"] == 0
    assert verified["label"]["mean_cosine"] == 1.0
    domains = [i.domain for i in onnx.load(model.path).opset_import]
    assert sorted(domains) == ["", "ai.onnx.ml"]


def test_string_labels_in_validation_data_are_kept(tmp_path: Path) -> None:
    # setup
    from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source
    from bladeflow.tasks.validate.prepare import prepare_validation_data, read_labels

    src = _skops_classifier(tmp_path)
    model = convert_source(str(src), tmp_path / "converted", ConvertOptions())
    x = _features(10, seed=5)
    data = tmp_path / "val.npz"
    np.savez(data, input=x, labels=_labels_of(x))
    # execute
    prepared = prepare_validation_data(model, str(data), tmp_path / "w")
    # assert
    labels = read_labels(prepared)
    assert labels is not None and labels.dtype.kind == "U"
    assert labels.tolist() == _labels_of(x).tolist()


def _skops_classifier(tmp_path: Path, forest: bool = False) -> Path:
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    x = _features(80)
    y = _labels_of(x)
    model = (
        RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0)
        if forest
        else LogisticRegression()
    )
    path = tmp_path / ("forest.skops" if forest else "logreg.skops")
    sio.dump(model.fit(x, y), path)
    return path


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("forest", [False, True], ids=["logreg", "forest"])
def test_optimize_flow_registers_a_string_label_classifier(
    tmp_path: Path, settings: Settings, bench_fast: dict[str, int], forest: bool
) -> None:
    # setup
    import mlflow
    from mlflow import MlflowClient

    from bladeflow.core.params import OptimizeParams
    from bladeflow.flows.optimize import optimize_flow

    src = _skops_classifier(tmp_path, forest)
    x = _features(24, seed=7)
    data = tmp_path / "val.npz"
    np.savez(data, input=x, labels=_labels_of(x))
    name = "forest-str" if forest else "logreg-str"
    params = OptimizeParams(
        source=str(src), name=name, data=str(data), batch_sizes=[1, 4], bench=bench_fast
    )
    # execute
    result = optimize_flow(params)
    # assert: registered, the labels judged by agreement
    assert result.version == "1" and result.model_uri == f"models:/{name}/1"
    assert result.accuracy["label"].mean_cosine == 1.0
    assert result.accuracy["label"].failing_samples == 0
    assert result.accuracy["probabilities"].max_abs_error < 1e-4
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id,
        artifact_path="reports/report/report.md",
        tracking_uri=settings.tracking_uri,
    )
    text = Path(local).read_text()
    chosen = text.split(f"### {result.candidate}: **pass**", 1)[1]
    row = next(line for line in chosen.splitlines() if line.startswith("| label |"))
    assert row.rstrip().endswith("| 1.0000 |"), row
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    assert client.get_model_version(name, "1").status == "READY"
