"""What every command shares: the --home/--tracking-uri options, settings with credentials moved
out of URIs, one way to report an error, and the filter that keeps user errors traceback-free.

One code path on purpose: a second copy of these once lost the credential handling.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from bladeflow.core.errors import AccuracyGateError, BladeflowError, UserInputError
from bladeflow.core.redact import redact, split_credentials
from bladeflow.core.settings import Settings

HOME_OPTION = typer.Option(
    None,
    "--home",
    envvar="BLADEFLOW_HOME",
    help="Data folder for the default SQLite registry, artifacts and Prefect state "
    "(default: ./.bladeflow).",
)
TRACKING_OPTION = typer.Option(
    None,
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (default: sqlite:///<home>/mlflow.db). "
    "A password in it is moved to MLFLOW_TRACKING_USERNAME/PASSWORD and never stored.",
)

# Exit code -> the word printed before the message.
_KIND = {2: "bad input", 3: "rolled back", 4: "error", 5: "busy", 6: "not improved"}


def say(message: str) -> None:
    """A progress or status line on stderr (stdout is kept for results such as --json)."""
    typer.echo(redact(message), err=True)


def fail(exc: BladeflowError) -> typer.Exit:
    """Print ``exc`` as one redacted paragraph and return the Exit carrying its exit code."""
    kind = "accuracy gate failed" if isinstance(exc, AccuracyGateError) else None
    say(f"bladeflow: {kind or _KIND.get(exc.exit_code, 'error')}: {exc}")
    return typer.Exit(exc.exit_code)


def settings_from(home: Path | None, tracking_uri: str | None, *, apply: bool = True) -> Settings:
    """Resolve the settings for a command and (by default) export them for MLflow and Prefect.

    A password in the tracking/registry URI moves to MLFLOW_TRACKING_USERNAME/PASSWORD (which
    MLflow sends as basic auth), so the URI that reaches logs, Prefect flow parameters and MLflow
    is the plain one.
    """
    settings = Settings.from_env(home=home, tracking_uri=tracking_uri)
    tracking, user, password = split_credentials(settings.tracking_uri)
    registry_uri, r_user, r_password = split_credentials(settings.registry_uri)
    for u, pw in ((user, password), (r_user, r_password)):
        if pw is not None:
            os.environ["MLFLOW_TRACKING_USERNAME"] = u or ""
            os.environ["MLFLOW_TRACKING_PASSWORD"] = pw
    settings = replace(settings, tracking_uri=tracking, registry_uri=registry_uri)
    if apply:
        settings.apply()
        exit_promptly_on_sigterm()
    return settings


def exit_promptly_on_sigterm() -> None:
    """SIGTERM ends the command at once with exit 143 (128 + 15), even while it is waiting on
    retries; `finally` blocks and the flow's failure hooks still run. Installed by every command
    that resolves settings (the server installs its own graceful drain instead)."""

    def _stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)


def params_or_exit(model: Any, **kwargs: Any) -> Any:
    """Build a pydantic parameter model; its validation errors become one UserInputError."""
    from pydantic import ValidationError

    try:
        return model(**kwargs)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserInputError(redact(problems)) from None


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs every failed task with its traceback; for errors the user can fix (bad file,
    bad data) the one-paragraph message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BladeflowError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install the filter on the loggers Prefect reports task and flow failures with."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideUserErrorTracebacks) for f in logger.filters):
            logger.addFilter(_HideUserErrorTracebacks())
