"""Shared fixtures. Prefect reads PREFECT_HOME at import, so the environment is set first."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="bladeflow-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["BLADEFLOW_HOME"] = str(_SESSION_HOME / "home")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# CLI subprocesses keep Prefect's temporary per-command server: a warm local server per test home
# would outlive the test. tests/ops/test_orchestration.py covers the warm path on purpose.
os.environ["BLADEFLOW_ORCHESTRATION"] = "ephemeral"

import pytest  # noqa: E402

from bladeflow.core.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for the whole session (starting one costs ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings rooted in a fresh temp folder: its own SQLite registry and artifact store."""
    home = tmp_path / "bladeflow"
    s = Settings.from_env(home=home, environ={})
    for key, value in s.environment().items():
        if key != "PREFECT_HOME":  # the harness owns Prefect's home for the session
            monkeypatch.setenv(key, value)
    s.home.mkdir(parents=True, exist_ok=True)
    # MLflow also keeps process-wide URIs that earlier tests (or a server fixture) may have set.
    import mlflow

    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_registry_uri(s.registry_uri)
    return s


@pytest.fixture
def bench_fast() -> dict[str, int]:
    """Benchmark settings that keep flow tests quick; speed is measured in bench/, not here."""
    return {"warmup": 1, "rounds": 2, "iterations": 3}
