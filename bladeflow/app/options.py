"""Parsing the optimize command's compact options and printing its result."""

from __future__ import annotations

import json
from typing import Any

import typer

from bladeflow.app.common import fail
from bladeflow.core.errors import UserInputError
from bladeflow.core.settings import Settings


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise fail(
            UserInputError(f"--batch-sizes {text!r} is not a list of integers; write e.g. 1,8,32")
        ) from None
    return sizes


def input_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, _, dims = item.rpartition(":")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            shapes[name] = []
        if not name or not shapes[name] or any(d < 1 for d in shapes[name]):
            raise fail(
                UserInputError(
                    f"--input-shape {item!r} is not NAME:DIMS; write e.g. pixels:1x3x224x224"
                )
            )
    return shapes


def dynamic_axes(text: str | None) -> dict[str, dict[int, str]] | None:
    if text is None:
        return None
    try:
        raw = json.loads(text)
        return {str(k): {int(a): str(n) for a, n in v.items()} for k, v in raw.items()}
    except (ValueError, AttributeError, TypeError):
        raise fail(
            UserInputError(
                f'--dynamic-axes {text!r} is not JSON like \'{{"x": {{"0": "batch"}}}}\''
            )
        ) from None


def print_result(result: Any, settings: Settings, quiet: bool = False) -> None:
    """The result on stdout: what was registered, the latency table, where the time went."""
    from bladeflow.app.console import stage_times
    from bladeflow.tasks.validate.summary import latency_table, render_table

    if result.synthetic_data:
        typer.echo(
            "NOTE: accuracy was judged on generated inputs, not your data; pass --data for a "
            "real verdict."
        )
    if result.outcome == "not_improved":
        typer.echo(
            f"\nNothing registered: the best candidate, {result.candidate}, is "
            f"x{result.incumbent_speedup} version {result.incumbent_version} (--must-beat) at "
            f"the objective, below --min-speedup. MLflow run {result.run_id} has the details."
        )
        return
    typer.echo(
        f"\nRegistered {result.model_uri} (alias 'candidate'), chosen recipe: "
        f"{result.candidate}; MLflow run {result.run_id}\n"
        f"Source latency measured with: {result.source_runtime}\n"
    )
    typer.echo(render_table(latency_table(result)))
    if quiet:
        return
    typer.echo("\n" + stage_times(result.stages))
    typer.echo(
        "\nBrowse the results in the MLflow UI:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {settings.tracking_uri} "
        "--host 127.0.0.1 --port 5000\n  then open http://127.0.0.1:5000 (Models -> "
        f"{result.name})"
    )
