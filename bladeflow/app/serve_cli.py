"""``bladeflow serve``: the command, as a plain function the main CLI registers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from bladeflow.app.common import settings_from
from bladeflow.core.mlflow_client import SERVING_HTTP_DEFAULTS, apply_http_defaults


def serve(
    model: list[str] = typer.Option(
        ..., "--model", "-m", help="Registered model to serve (repeat for several)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, "--port", "-p", help="TCP port."),
    max_batch_size: int | None = typer.Option(
        None,
        "--max-batch-size",
        help="Rows per batch at most; 1 turns dynamic batching off [default: the version's "
        "bladeflow.serving_config tag, else 32]. Each of these five flags beats the tag.",
    ),
    batch_timeout_ms: float | None = typer.Option(
        None, "--batch-timeout-ms", help="How long a batch waits for more requests [tag, else 2]."
    ),
    max_queue_size: int | None = typer.Option(
        None,
        "--max-queue-size",
        help="Waiting requests per model before answering 429 [tag, else 256].",
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Batches run at the same time per version [tag, else 1]."
    ),
    intra_op_threads: int | None = typer.Option(
        None,
        "--intra-op-threads",
        help="ONNX Runtime intra-op threads (0: the recipe's setting) [tag, else 0].",
    ),
    version: str | None = typer.Option(
        None,
        "--version",
        help="Serve this version of the (one) --model instead of its champion/canary aliases "
        "(what `bladeflow tune-serving` measures).",
    ),
    request_timeout_s: float = typer.Option(
        30.0, "--request-timeout", help="Seconds before a request is answered 504."
    ),
    poll_interval: float = typer.Option(
        10.0, "--poll-interval", help="Seconds between registry polls (alias/weight changes)."
    ),
    shadow: float = typer.Option(
        0.0, "--shadow", help="Share (0-1) of champion requests also run on the canary, compared."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="BLADEFLOW_SERVE_TOKEN",
        help="Require 'Authorization: Bearer TOKEN' (health endpoints stay open). Prefer the "
        "environment variable: a --token value is visible to other local users in `ps`.",
    ),
    max_body_mb: float = typer.Option(8.0, "--max-body-mb", help="Largest request body (413)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
    home: Path | None = typer.Option(
        None, "--home", envvar="BLADEFLOW_HOME", help="Data folder [default: ./.bladeflow]."
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."
    ),
) -> None:
    """Serve registered models over the Open Inference Protocol (v2) with dynamic batching.

    Serves each model's 'champion' version and sends bladeflow.canary_weight % of traffic to its
    'canary'; polls the registry and swaps versions without dropping requests. Exit code 2 when
    a model has no champion.
    """
    from bladeflow.core.errors import UserInputError
    from bladeflow.core.registry import check_model_name
    from bladeflow.serving.model import ServeOptions
    from bladeflow.serving.server import ServerConfig, run

    settings = settings_from(home, tracking_uri)  # a password in the URI moves to the env
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The poller retries every --poll-interval itself. MLflow's own defaults (7 retries with
    # exponential backoff, 120 s timeout) kept one poll of a dead registry hanging for minutes,
    # so an outage went unreported that long; fail fast and let the next poll retry.
    apply_http_defaults(SERVING_HTTP_DEFAULTS)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    flags = {
        "max_batch_size": max_batch_size,
        "batch_timeout_ms": batch_timeout_ms,
        "max_queue_size": max_queue_size,
        "workers": workers,
        "intra_op_threads": intra_op_threads,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    problems = []
    if not 0.0 <= shadow <= 1.0:
        problems.append("--shadow must be between 0 and 1 (a share of champion requests)")
    if any(given.get(k, 1) < 1 for k in ("max_batch_size", "max_queue_size", "workers")):
        problems.append("--max-batch-size, --max-queue-size and --workers must be >= 1")
    if version is not None and (len(set(model)) != 1 or not version.isdigit()):
        problems.append("--version takes a version number and exactly one --model")
    try:
        for name in model:
            check_model_name(name)
    except UserInputError as exc:
        problems.append(str(exc))
    if problems:
        typer.echo("bladeflow: bad input: " + "; ".join(problems), err=True)
        raise typer.Exit(2)
    options = ServeOptions(
        **given,  # type: ignore[arg-type]
        request_timeout_s=request_timeout_s,
        shadow_share=shadow,
    )
    config = ServerConfig(
        host=host,
        port=port,
        token=token or None,
        max_body_bytes=int(max_body_mb * (1 << 20)),
        poll_interval_s=poll_interval,
        log_level=log_level.lower(),
        pinned=((model[0], version),) if version is not None else (),
        explicit=frozenset(given),
    )
    from bladeflow.serving.fleet import NoChampionError

    try:
        run(settings, list(dict.fromkeys(model)), options, config)
    except NoChampionError as exc:
        typer.echo(f"bladeflow: bad input: {exc}", err=True)
        raise typer.Exit(2) from None
