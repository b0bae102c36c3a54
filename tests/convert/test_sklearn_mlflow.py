"""scikit-learn (skops) sources and MLflow model URIs logged to a scratch SQLite registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.dispatch import (
    ConvertOptions,
    convert_source,
    detect,
    open_source_runner,
)
from tests import models


def _max_abs(work: Path) -> float:
    outputs = json.loads((work / "convert_config.json").read_text())["verification"]["outputs"]
    for name, acc in outputs.items():
        print(
            f"MAXERR {work.name} {name} abs={acc['max_abs_error']:.3g} "
            f"rel={acc['max_rel_error']:.3g}"
        )
    return max(a["max_abs_error"] for a in outputs.values())


def _classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5))
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)


def test_skops_pipeline_converts(tmp_path: Path):
    # setup
    import skops.io as sio

    src = tmp_path / "clf.skops"
    sio.dump(_classifier(), src)
    work = tmp_path / "skops_classifier"
    # execute
    art = convert_source(str(src), work, ConvertOptions())
    # assert
    assert detect(str(src)) == "sklearn"
    assert [(s.name, s.shape) for s in art.signature.inputs] == [("input", ["batch", 5])]
    assert [o.name for o in art.signature.outputs] == ["label", "probabilities"]
    assert _max_abs(work) < 1e-5
    runner = open_source_runner(str(src), ConvertOptions(), art)
    assert runner is not None and runner.name == "scikit-learn"


def test_skops_regressor_converts(tmp_path: Path):
    # setup
    import skops.io as sio
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    src = tmp_path / "reg.skops"
    sio.dump(RandomForestRegressor(n_estimators=5, random_state=0).fit(x, x.sum(1)), src)
    work = tmp_path / "skops_regressor"
    # execute
    art = convert_source(str(src), work, ConvertOptions())
    # assert
    assert art.signature.outputs[0].shape[-1] == 1
    assert _max_abs(work) < 1e-4


def test_mlflow_onnx_by_version_and_alias(tmp_path: Path, mlflow_registry: str):
    # setup
    import mlflow
    import onnx

    onnx_model = onnx.load(models.mlp(tmp_path / "mlp.onnx"))
    with mlflow.start_run():
        mlflow.onnx.log_model(
            onnx_model, name="model", registered_model_name="mlp", pip_requirements=[]
        )
    mlflow.MlflowClient().set_registered_model_alias("mlp", "champion", "1")
    # execute
    by_version = convert_source("models:/mlp/1", tmp_path / "v1", ConvertOptions())
    by_alias = convert_source("models:/mlp@champion", tmp_path / "alias", ConvertOptions())
    # assert
    assert by_version.sha256 == by_alias.sha256
    assert by_version.provenance.source == "models:/mlp/1"
    assert by_version.provenance.step is not None
    assert by_version.provenance.step.name == "convert.mlflow"
    assert by_version.provenance.step.config["mlflow_flavor"] == "onnx"
    assert not (tmp_path / "v1" / "mlflow-model").exists()


def test_mlflow_sklearn_skops_run_uri(tmp_path: Path, mlflow_registry: str):
    # setup
    import mlflow

    with mlflow.start_run() as run:
        mlflow.sklearn.log_model(
            _classifier(), name="model", serialization_format="skops", pip_requirements=[]
        )
    uri = f"runs:/{run.info.run_id}/model"
    work = tmp_path / "mlflow_sklearn"
    # execute
    art = convert_source(uri, work, ConvertOptions())
    # assert
    assert art.provenance.step is not None
    assert art.provenance.step.config["inner_format"] == "sklearn"
    assert _max_abs(work) < 1e-5
    runner = open_source_runner(uri, ConvertOptions(), art)
    assert runner is not None and runner.name == "scikit-learn"


def test_mlflow_pickled_sklearn_is_refused(tmp_path: Path, mlflow_registry: str):
    # setup
    import mlflow

    with mlflow.start_run():
        mlflow.sklearn.log_model(
            _classifier(),
            name="model",
            serialization_format="cloudpickle",
            registered_model_name="pickled",
            pip_requirements=[],
        )
    # execute / assert
    with pytest.raises(ModelFileError, match=r"pickle.*serialization_format='skops'"):
        convert_source("models:/pickled/1", tmp_path / "w", ConvertOptions())


def test_mlflow_missing_model_says_what_to_check(tmp_path: Path, mlflow_registry: str):
    with pytest.raises(
        ModelFileError, match=r"cannot download models:/nope/1.*MLFLOW_TRACKING_URI"
    ):
        convert_source("models:/nope/1", tmp_path / "w", ConvertOptions())


@pytest.mark.torch
def test_mlflow_pytorch_pt2(tmp_path: Path, mlflow_registry: str):
    # setup
    import mlflow
    import torch

    from tests.convert.torch_models import ConvNet

    torch.manual_seed(0)
    example = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            ConvNet().eval(),
            name="model",
            serialization_format="pt2",
            input_example=example,
            registered_model_name="convnet",
            pip_requirements=[],
        )
    work = tmp_path / "mlflow_pt2"
    # execute
    art = convert_source("models:/convnet/1", work, ConvertOptions())
    # assert
    assert art.provenance.step is not None
    assert art.provenance.step.config["inner_format"] == "torch_export"
    assert art.signature.inputs[0].shape[1:] == [3, 16, 16]
    assert _max_abs(work) < 1e-4
