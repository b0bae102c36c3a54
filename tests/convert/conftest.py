"""Convert-test fixtures: offline Hugging Face, quiet TensorFlow, a scratch MLflow registry."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scratch SQLite tracking + registry store (one per module: creating one costs seconds);
    the converter reads it from MLFLOW_TRACKING_URI like the CLI sets it."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("convert-tests")
        yield uri
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri("")
