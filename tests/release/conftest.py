"""Fixtures for the release tests: a real SQLite MLflow registry per test, fast version setup."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bladeflow.core import registry
from bladeflow.core.release_plan import GatePolicy, ReleasePlan, StagePlan
from bladeflow.core.settings import Settings
from bladeflow.tasks.release import tracking


@pytest.fixture(scope="session")
def _release_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("release-home")


@pytest.fixture
def settings(_release_home: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """One SQLite registry for all release tests (creating one costs 10-20 s on busy cores);
    every test uses model names of its own."""
    s = Settings.from_env(home=_release_home / "bladeflow", environ={})
    for key, value in s.environment().items():
        if key != "PREFECT_HOME":  # the harness owns Prefect's home for the session
            monkeypatch.setenv(key, value)
    s.home.mkdir(parents=True, exist_ok=True)
    return s


@pytest.fixture
def client(settings: Settings) -> Any:
    return tracking.client(settings)


@pytest.fixture
def add_version(client: Any, tmp_path: Path) -> Callable[..., str]:
    """Register a version without a model file (flow tests never load it): returns its number."""
    from mlflow.exceptions import MlflowException

    source = tmp_path / "artifact"
    source.mkdir(exist_ok=True)

    def add(name: str, validated: bool = True, alias: str | None = None) -> str:
        with contextlib.suppress(MlflowException):  # already registered
            client.create_registered_model(name, tags={registry.MODEL_TAG_CANARY_WEIGHT: "0"})
        mv = client.create_model_version(
            name,
            source=source.as_uri(),
            tags={registry.TAG_VALIDATED: "true" if validated else "false"},
        )
        if alias:
            client.set_registered_model_alias(name, alias, str(mv.version))
        return str(mv.version)

    return add


def quick_plan(
    seconds: float = 0.5, requests: int = 20, stages: list[StagePlan] | None = None, **kw: Any
) -> ReleasePlan:
    """Every default stage, ``seconds`` long, judged on ``requests`` requests."""
    names = [("shadow", 0, 100), ("canary-5", 5, 0), ("canary-25", 25, 0), ("canary-50", 50, 0)]
    names.append(("full", 100, 0))
    plan_stages = stages or [
        StagePlan(
            name=n,
            weight=w,
            shadow_share=sh,
            min_duration_s=seconds,
            max_duration_s=seconds * 10,
            min_requests=requests,
        )
        for n, w, sh in names
    ]
    options: dict[str, Any] = {
        "gates": GatePolicy(min_latency_samples=requests),
        "poll_interval_s": 0.2,
        "sync_timeout_s": 20,
        "lease_ttl_s": 5,
        "approval_poll_s": 1,
    }
    options.update(kw)
    return ReleasePlan(stages=plan_stages, **options)


class Background:
    """Run a callable in a thread; keep its result or exception."""

    def __init__(self, fn: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as exc:  # noqa: BLE001 - kept for the test to assert on
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"still running after {timeout} s")


@pytest.fixture(autouse=True)
def _restore_environ() -> Any:
    """The CLI functions call ``Settings.apply()``, which exports variables: undo that."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
