"""One settings object for every path, URI and switch bladeflow uses.

Defaults keep everything under ``./.bladeflow/`` in the working directory; environment variables
and CLI flags override them. Nothing is read or written at import time: build a ``Settings`` with
``Settings.from_env()`` and call ``apply()`` once, at program start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

ENV_HOME = "BLADEFLOW_HOME"
ENV_EXPERIMENT = "BLADEFLOW_EXPERIMENT"


@dataclass(frozen=True)
class Settings:
    """Where bladeflow keeps its state, and which services it talks to.

    Attributes:
        home: Root data folder (default ``./.bladeflow``).
        tracking_uri: MLflow tracking URI (default SQLite at ``<home>/mlflow.db``).
        registry_uri: MLflow registry URI (default: same as ``tracking_uri``).
        artifact_root: Where new MLflow experiments store artifacts (default ``<home>/artifacts``).
        prefect_home: ``PREFECT_HOME`` (default ``<home>/prefect``).
        experiment: MLflow experiment that optimize runs are logged to.
        telemetry: Whether MLflow/Prefect telemetry stays on (default off).
    """

    home: Path
    tracking_uri: str
    registry_uri: str
    artifact_root: str
    prefect_home: Path
    experiment: str = "bladeflow"
    telemetry: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(
        cls,
        *,
        home: str | Path | None = None,
        tracking_uri: str | None = None,
        environ: dict[str, str] | None = None,
    ) -> Settings:
        """Resolve settings: explicit arguments, then environment, then defaults."""
        env = os.environ if environ is None else environ
        home_path = Path(home or env.get(ENV_HOME) or ".bladeflow").expanduser().resolve()
        tracking = tracking_uri or env.get("MLFLOW_TRACKING_URI") or _sqlite_uri(home_path)
        registry = env.get("MLFLOW_REGISTRY_URI") or tracking
        artifacts = env.get("BLADEFLOW_ARTIFACT_ROOT") or (home_path / "artifacts").as_uri()
        prefect_home = Path(env.get("PREFECT_HOME") or home_path / "prefect")
        return cls(
            home=home_path,
            tracking_uri=tracking,
            registry_uri=registry,
            artifact_root=artifacts,
            prefect_home=prefect_home,
            experiment=env.get(ENV_EXPERIMENT, "bladeflow"),
            telemetry=env.get("BLADEFLOW_TELEMETRY", "").lower() in {"1", "true", "yes"},
        )

    def with_tracking_uri(self, uri: str | None) -> Settings:
        """Return a copy whose tracking and registry URIs are ``uri`` (no-op for ``None``)."""
        if not uri:
            return self
        return replace(self, tracking_uri=uri, registry_uri=uri)

    def environment(self) -> dict[str, str]:
        """The environment variables that make MLflow and Prefect follow these settings."""
        env = {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_REGISTRY_URI": self.registry_uri,
            "PREFECT_HOME": str(self.prefect_home),
            ENV_HOME: str(self.home),
            ENV_EXPERIMENT: self.experiment,
        }
        if not self.telemetry:
            env.update(
                {
                    "MLFLOW_DISABLE_TELEMETRY": "true",
                    "DO_NOT_TRACK": "1",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                }
            )
        env.update(self.extra_env)
        return env

    def apply(self) -> None:
        """Create the data folders and export the environment for MLflow and Prefect.

        Must run before ``prefect`` is imported: Prefect reads ``PREFECT_HOME`` at import and
        otherwise creates ``~/.prefect``.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        if self.artifact_root.startswith("file:"):
            Path(self.artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        os.environ.update(self.environment())
        # The first start of Prefect's temporary server migrates a new database: on two busy
        # cores that takes longer than Prefect's 20 s default.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

    @property
    def workdir(self) -> Path:
        """Scratch space for converted models and candidates of flow runs."""
        return self.home / "work"


def _sqlite_uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"
