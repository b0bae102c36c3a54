"""``bladeflow tune-serving``: the command, as a plain function the main CLI registers."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from bladeflow.app.common import (
    HOME_OPTION,
    TRACKING_OPTION,
    fail,
    params_or_exit,
    quiet_user_error_tracebacks,
    say,
    settings_from,
)
from bladeflow.core.errors import BladeflowError


def tune_serving(
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version number or alias (e.g. candidate)."),
    slo_p99_ms: float = typer.Option(
        100.0, "--slo-p99-ms", help="p99 latency (ms, from the scheduled send) to sustain."
    ),
    budget_s: float = typer.Option(
        300.0, "--budget-s", help="Seconds for the whole search, the source's included."
    ),
    target_qps: float = typer.Option(
        1000.0, "--target-qps", help="Requests/s the capacity numbers (cores needed) plan for."
    ),
    source: bool = typer.Option(
        True,
        "--source/--no-source",
        help="Also tune the unoptimized source behind the same server (capacity 'saved %').",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout (progress stays on stderr)."
    ),
    home: Path | None = HOME_OPTION,
    tracking_uri: str | None = TRACKING_OPTION,
) -> None:
    """Find the serving configuration that sustains the most requests/s at a p99 SLO.

    Starts the real `bladeflow serve` on loopback with each configuration it tries (batch size,
    batch timeout, workers, threads, queue) and drives open-loop load at rising rates with
    requests built from the version's validation inputs. A winner other than the defaults is
    climbed again beside them, interleaved, in the last 30% of the budget, and replaces them only
    when it sustains more than 5% more (noise ends climbs early). Records the winner as the
    version tag bladeflow.serving_config (`bladeflow serve` then uses it unless flags say
    otherwise), the table and a plot under the version run's serving_tune/ artifacts, and the
    capacity (QPS per core, cores for --target-qps, resources saved against the source) in the
    version description.
    Exit codes: 0 done; 2 bad input; 4 MLflow unusable.
    """
    from bladeflow.app.orchestration import use_prefect_api
    from bladeflow.app.preflight import check_experiment
    from bladeflow.core.params import TuneParams
    from bladeflow.tasks.benchmark.incumbent import resolve_version

    settings = settings_from(home, tracking_uri)
    try:
        params = params_or_exit(
            TuneParams,
            name=name,
            version=version,
            slo_p99_ms=slo_p99_ms,
            budget_s=budget_s,
            target_qps=target_qps,
            source=source,
            tracking_uri=settings.tracking_uri,
        )
        check_experiment(settings.tracking_uri)
        # A wrong name or version is refused here, before a Prefect server or flow starts.
        resolve_version(settings, name, version, what="version", hint="")
        say(
            f"tune-serving: {name} version {version}, p99 <= {slo_p99_ms:g} ms, "
            f"budget {budget_s:g} s (tracking {settings.tracking_uri})"
        )
        use_prefect_api(settings, say)  # before Prefect is imported
        from bladeflow.flows.tune import tune_serving_flow

        quiet_user_error_tracebacks()
        # Prefect and MLflow print to stdout; keep stdout for the result (e.g. --json).
        with contextlib.redirect_stdout(sys.stderr):
            result = tune_serving_flow(params)
    except BladeflowError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    from bladeflow.tasks.benchmark.serving_tune import capacity_markdown, table_markdown

    typer.echo(table_markdown(result))
    typer.echo("")
    typer.echo(capacity_markdown(result))
    if result.serving_config is None:
        typer.echo(f"serving_config: none recorded ({result.reason})")
    else:
        typer.echo(f"serving_config: {result.serving_config}")
