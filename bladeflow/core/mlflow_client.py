"""The one factory for MLflow clients: every stage, flow, server and command builds them here.

MLflow's HTTP retry defaults (7 retries, backoff factor 2) keep one call against a stopped server
busy for about 4 minutes. bladeflow lowers them unless the environment sets them, so a dead server
fails a run in seconds: batch work (flows, CLI) retries 3 times with backoff 1 (sleeps 0, 2, 4 s);
the server, which polls, retries once with a 15 s timeout so an outage shows within one poll.
"""

from __future__ import annotations

import os
from typing import Any

from bladeflow.core.settings import Settings

# Batch work: the Prefect tasks around MLflow calls retry on top of these.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# The server: a poll that fails fast is retried by the next poll.
SERVING_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def apply_http_defaults(defaults: dict[str, str] = HTTP_DEFAULTS) -> None:
    """Export bounded MLflow HTTP retries, keeping any value the user already set."""
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def mlflow_client(settings: Settings) -> Any:
    """An ``MlflowClient`` for the settings' tracking and registry URIs, with bounded retries."""
    from mlflow import MlflowClient

    apply_http_defaults()
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
