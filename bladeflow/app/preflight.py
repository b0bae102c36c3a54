"""Checks every command runs before any work (and before a Prefect server starts): seconds, not
minutes, for a bad file, bad data, or a registry that cannot be used."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bladeflow.core.errors import RegistryError, UserInputError
from bladeflow.core.settings import Settings

# An unreachable tracking server fails in ~3 s (three tries, 1 s and 2 s apart) instead of after
# the first stage and MLflow's own (long) retries.
PROBE_DELAYS_S = (1.0, 2.0)


def check_optimize_input(params: Any) -> None:
    """Fail fast on a source, data or option the optimize flow cannot use."""
    from bladeflow.tasks.convert.base import get_converter
    from bladeflow.tasks.convert.dispatch import detect
    from bladeflow.tasks.convert.onnx_source import load_onnx_source
    from bladeflow.tasks.optimize.recipes import resolve_recipes
    from bladeflow.tasks.validate.data import check_array_files, load_npz

    fmt = detect(params.source, params.format)
    get_converter(fmt).precheck(params.source)  # size limit, truncated archives: no framework
    resolve_recipes(params.preset, params.passes)
    if params.data and not Path(params.data).exists():
        raise UserInputError(f"validation data {params.data} does not exist")
    if params.data:
        check_array_files(params.data)  # headers only: nothing huge or truncated is allocated
    check_tracking_server(params.tracking_uri)
    if fmt == "onnx":  # other formats are loaded by their converter, which needs the framework
        with tempfile.TemporaryDirectory(prefix="bladeflow-preflight-") as tmp:
            model = load_onnx_source(params.source, Path(tmp))
            if params.data and params.data.endswith(".npz"):
                load_npz(params.data, model.signature)
    # Last: bad input is reported without touching the registry (this may create the database).
    check_experiment(params.tracking_uri)


def check_tracking_server(uri: str | None) -> None:
    """Exit 4 before any work when an HTTP tracking server does not answer its /health."""
    import httpx

    if not uri or not uri.startswith(("http://", "https://")):
        return
    last: str = ""
    for delay in (*PROBE_DELAYS_S, None):
        try:
            httpx.get(uri.rstrip("/") + "/health", timeout=5)
            return  # any answer: the server is up (authorization is checked by real calls)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if delay is not None:
            time.sleep(delay)
    raise RegistryError(
        f"cannot use MLflow at {uri}: no answer after {len(PROBE_DELAYS_S) + 1} tries "
        f"({last[:300]}). "
        "Check --tracking-uri / MLFLOW_TRACKING_URI and that the server is running."
    )


def check_experiment(uri: str | None) -> None:
    """Exit 4 before any work when the experiment's artifact store cannot be used from here."""
    from bladeflow.tasks.register.mlflow_registry import ensure_experiment

    ensure_experiment(Settings.from_env().with_tracking_uri(uri))
