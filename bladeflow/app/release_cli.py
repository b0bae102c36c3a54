"""``bladeflow release ...``: plain functions the main CLI registers as a sub-app.

Wiring (bladeflow/app/cli.py)::

    from bladeflow.app import release_cli
    release_app = typer.Typer(name="release", help="Staged gray release.", no_args_is_help=True)
    for fn in (release_cli.start, release_cli.status, release_cli.promote, release_cli.rollback):
        release_app.command()(fn)
    app.add_typer(release_app)

Exit codes: 0 done; 2 bad input (unknown model/version, not validated, bad plan); 3 rolled back
(a gate failed or approval was refused; the champion kept serving); 4 MLflow unusable; 5 another
release of the model is in progress.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import typer

from bladeflow.app.common import (
    HOME_OPTION,
    TRACKING_OPTION,
    fail,
    params_or_exit,
    say,
    settings_from,
)
from bladeflow.app.preflight import check_tracking_server
from bladeflow.core.errors import BladeflowError
from bladeflow.core.settings import Settings

HOME = HOME_OPTION
TRACKING = TRACKING_OPTION
ACTOR = typer.Option(
    None, "--actor", envvar="BLADEFLOW_ACTOR", help="Who does this (recorded) [default: $USER]."
)


def _settings(home: Path | None, tracking_uri: str | None) -> Settings:
    """The shared settings path (credentials out of the URI), then the registry preflight: an
    unreachable tracking server is exit 4 in seconds, before any work."""
    settings = settings_from(home, tracking_uri)
    check_tracking_server(settings.tracking_uri)
    return settings


def _done(name: str, action: str, message: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"name": name, "action": action, "message": message}, indent=2))
    else:
        typer.echo(message)


def start(
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version to release (must be validated)."),
    plan: str = typer.Option(
        "default", "--plan", help="Preset (default, fast) or a .json/.yaml ReleasePlan file."
    ),
    approval: bool = typer.Option(
        False, "--approval", help="Pause before the last stage until approved in the Prefect UI."
    ),
    endpoint: list[str] = typer.Option(
        [],
        "--endpoint",
        "-e",
        help="Serving base URL to scrape (repeat per replica) [default: $BLADEFLOW_SERVING_URLS "
        "or http://127.0.0.1:8080].",
    ),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    home: Path | None = HOME,
    tracking_uri: str | None = TRACKING,
) -> None:
    """Release VERSION of NAME stage by stage (shadow, 5%, 25%, 50%, 100%), gated by metrics.

    Re-running it after a crash resumes the interrupted release (same version) or rolls it back
    (other version) once its lease has expired.
    """
    from bladeflow.core.params import ReleaseParams
    from bladeflow.core.release_plan import load_plan

    try:
        settings = _settings(home, tracking_uri)
        extra: dict[str, Any] = {"endpoints": endpoint} if endpoint else {}
        params = params_or_exit(
            ReleaseParams,
            name=name,
            version=version,
            plan=load_plan(plan),
            approval=approval,
            actor=actor,
            tracking_uri=settings.tracking_uri,
            **extra,
        )
        from bladeflow.app.orchestration import use_prefect_api

        use_prefect_api(settings, say)  # before Prefect is imported
        from bladeflow.flows.release import release_flow

        typer.echo(
            f"release: {name} version {version} ({len(params.plan.stages)} stages)", err=True
        )
        with contextlib.redirect_stdout(sys.stderr):  # Prefect/MLflow chatter stays off stdout
            result = release_flow(params)
    except BladeflowError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    typer.echo(f"{name} version {version}: {result.outcome} ({result.reason})")
    for s in result.stages:
        typer.echo(
            f"  {s.name:<10} weight {s.weight:>3}%  {s.decision:<7} "
            f"requests {int(s.metrics.get('canary_requests', 0))}  {s.reason}"
        )
    typer.echo(f"champion: {result.champion}; MLflow run {result.run_id}")


def status(
    name: str = typer.Argument(..., help="Registered model name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    home: Path | None = HOME,
    tracking_uri: str | None = TRACKING,
) -> None:
    """Show champion, canary, weights, the lease and the release in progress (read-only)."""
    from bladeflow.tasks.release.manual import describe
    from bladeflow.tasks.release.tracking import client

    try:
        doc = describe(client(_settings(home, tracking_uri)), name)
    except BladeflowError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(
        f"{name}: {doc['state']}; champion {doc['champion']}, canary {doc['canary']} "
        f"(weight {doc['canary_weight']}%, shadow {doc['shadow_share']}%), previous champion "
        f"{doc['previous_champion']}"
    )
    if doc["lease"]:
        typer.echo(f"  lease: {doc['lease']['description']}")
    if doc.get("next"):
        typer.echo(f"  next: {doc['next']}")


def promote(
    name: str = typer.Argument(..., help="Registered model name."),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    home: Path | None = HOME,
    tracking_uri: str | None = TRACKING,
) -> None:
    """Finish the release in progress now: its canary becomes the champion."""
    _force("promote", name, actor, as_json, home, tracking_uri)


def rollback(
    name: str = typer.Argument(..., help="Registered model name."),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    home: Path | None = HOME,
    tracking_uri: str | None = TRACKING,
) -> None:
    """Stop the release in progress (canary gets no traffic), else restore the previous champion."""
    _force("rollback", name, actor, as_json, home, tracking_uri)


def _force(
    action: str, name: str, actor: str | None, as_json: bool, home: Path | None, uri: str | None
) -> None:
    from bladeflow.tasks.release.engine import default_actor
    from bladeflow.tasks.release.manual import force_promote, force_rollback
    from bladeflow.tasks.release.tracking import client

    act = force_promote if action == "promote" else force_rollback
    try:
        message = act(client(_settings(home, uri)), name, actor or default_actor())
        _done(name, action, message, as_json)
    except BladeflowError as exc:
        raise fail(exc) from None
