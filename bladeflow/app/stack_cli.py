"""``bladeflow up`` and ``bladeflow down``: the local stack's commands (see ``stack.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bladeflow.app.common import HOME_OPTION
from bladeflow.app.orchestration import stop_local
from bladeflow.app.stack import StackConfig, StackError, stack_status, start_stack, stop_stack
from bladeflow.core.settings import Settings


def _echo(message: str) -> None:
    typer.echo(message, err=True)


HOME = HOME_OPTION
PREFECT_PORT = typer.Option(4200, "--prefect-port", help="Prefect server port on 127.0.0.1.")
MLFLOW_PORT = typer.Option(5000, "--mlflow-port", help="MLflow tracking server port.")
S3_PORT = typer.Option(
    8333, "--s3-port", help="SeaweedFS S3 port; the 7 ports after it are used too."
)


def _config(home: Path | None, **kwargs: object) -> StackConfig:
    resolved = Settings.from_env(home=home).home
    return StackConfig(home=resolved, **kwargs)  # type: ignore[arg-type]


def up(
    status: bool = typer.Option(False, "--status", help="Only show what is running."),
    as_json: bool = typer.Option(False, "--json", help="With --status: print JSON on stdout."),
    home: Path | None = HOME,
    prefect_port: int = PREFECT_PORT,
    mlflow_port: int = MLFLOW_PORT,
    s3_port: int = S3_PORT,
    s3: bool = typer.Option(
        True,
        "--s3/--no-s3",
        help="Artifacts in a local SeaweedFS S3 bucket, or in <home>/artifacts.",
    ),
    bucket: str = typer.Option("bladeflow", "--bucket", help="S3 bucket for MLflow artifacts."),
    work_pool: str = typer.Option("bladeflow", "--work-pool", help="Prefect process work pool."),
    nightly_cron: str = typer.Option(
        "0 2 * * *", "--nightly-cron", help="When nightly re-optimization runs (cron)."
    ),
    timezone: str = typer.Option("UTC", "--timezone", help="Time zone of the nightly schedule."),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for each service."),
) -> None:
    """Start S3 (SeaweedFS), MLflow, the Prefect server and a worker; register the deployments."""
    cfg = _config(
        home,
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        s3_port=s3_port,
        s3=s3,
        bucket=bucket,
        work_pool=work_pool,
        nightly_cron=nightly_cron,
        timezone=timezone,
        timeout_s=timeout,
    )
    if status:
        _print_status(cfg, as_json)
        return
    try:
        # One Prefect server per home: the stack's replaces the CLI's local one.
        stop_local(Settings.from_env(home=cfg.home))
        timings = start_stack(cfg)
    except StackError as exc:
        _echo(f"bladeflow up: {exc}")
        raise typer.Exit(2) from None
    typer.echo("bladeflow stack is up (start-up seconds in brackets):")
    urls = {
        "s3": f"{cfg.s3_url} (bucket {cfg.bucket})",
        "mlflow": f"{cfg.mlflow_url} (UI and tracking API)",
        "prefect": f"http://{cfg.host}:{cfg.prefect_port} (UI; API {cfg.prefect_api})",
        "worker": f"work pool {cfg.work_pool!r}",
    }
    for name, text in urls.items():
        if name in timings:
            typer.echo(f"  {name:<8} {text} [{timings[name]} s]")
    typer.echo(f"Point the CLI at it:  source {cfg.env_file}")
    typer.echo(f"Logs: {cfg.log_dir}    Stop: bladeflow down")


def down(
    home: Path | None = HOME,
    grace: float = typer.Option(
        30.0, "--grace", help="Seconds each service gets to exit after SIGTERM before SIGKILL."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was stopped as JSON."),
) -> None:
    """Stop the services `bladeflow up` started (worker, Prefect, MLflow, S3) and the local
    Prefect server other commands started; nothing else."""
    cfg = _config(home)
    outcomes = stop_stack(cfg, grace)
    local = stop_local(Settings.from_env(home=cfg.home))
    if local is not None:
        outcomes["prefect-local"] = local
    if as_json:
        typer.echo(json.dumps(outcomes, indent=2))
        return
    for name, outcome in outcomes.items():
        typer.echo(f"  {name:<13} {outcome}")


def _print_status(cfg: StackConfig, as_json: bool = False) -> None:
    status = stack_status(cfg)
    if as_json:
        typer.echo(json.dumps(status, indent=2, default=str))
        return
    for name, st in status.items():
        state = "healthy" if st["healthy"] else "running" if st["running"] else "stopped"
        pid = f" pid {st['pid']}" if st["pid"] else ""
        typer.echo(f"  {name:<8} {state:<8} {st['url']}{pid}")
