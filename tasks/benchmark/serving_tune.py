"""The serving-tune stage: tune ``bladeflow serve`` for a registered version, measure capacity,
and record both in the registry.

:func:`tune_serving` builds requests from the version's validation inputs, searches the serving
configurations of the version (and of its unoptimized source behind the same server) with
:mod:`.serving_search`, and returns a :class:`TuneResult`; :func:`record` writes the winner as the
version tag ``bladeflow.serving_config``, the table and plot as MLflow artifacts of the version's
run (``serving_tune/``) and the capacity into the version description.

Capacity is the reference's resource number: a replica of this machine's ``cores`` sustains
``sustained_qps`` at the SLO, so one core carries ``qps_per_core = sustained_qps / cores`` and a
target rate needs ``target_qps / qps_per_core`` cores. The server and the load generator share
those cores, so the numbers are conservative; the server's own CPU use at the sustained rate is
reported beside them.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, Field

from bladeflow.core import registry
from bladeflow.core.errors import UserInputError
from bladeflow.core.mlflow_client import mlflow_client
from bladeflow.core.settings import Settings
from bladeflow.tasks.benchmark.incumbent import download_version, resolve_version
from bladeflow.tasks.benchmark.serving_search import (
    MIN_CONFIG_S,
    Confirmation,
    ModelTuning,
    Say,
    machine_cores,
    tune_model,
)
from bladeflow.tasks.benchmark.serving_server import ServedModel, source_registry

ARTIFACT_DIR = "serving_tune"
CAPACITY_HEADING = "## Serving capacity"
SOURCE_SHARE = 0.35  # of the budget, for the source's (coarse) search when it is measured
# The least time in which a search measures one configuration: its start-up plus the
# configuration (tune_model's rule), and 5 s for the time spent between its checks. When the
# source's share is shorter, the source is left out and the version gets the whole budget: one
# search that measures something beats two that measure nothing.
MIN_SEARCH_S = 2 * MIN_CONFIG_S + 5
_V2_TYPES = {
    "float32": "FP32", "float64": "FP64", "float16": "FP16", "int64": "INT64", "int32": "INT32",
    "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
}  # fmt: skip


class CapacityRow(BaseModel):
    label: str  # chosen or source
    version: str
    serving_config: dict[str, Any]
    sustained_qps: float
    qps_per_core: float
    cores_needed: float  # for the target rate
    server_cpu_cores: float | None  # what the server process used at the sustained rate


class Capacity(BaseModel):
    target_qps: float
    slo_p99_ms: float
    cores: int = Field(description="cores of this machine, shared by server and load generator")
    chosen: CapacityRow | None = None
    source: CapacityRow | None = None
    saved_percent: float | None = Field(None, description="100 * (1 - chosen/source cores)")
    reason: str | None = None  # why a part is missing


class TuneResult(BaseModel):
    name: str
    version: str
    slo_p99_ms: float
    budget_s: float
    serving_config: dict[str, Any] | None  # the tag's value; None when no config held the SLO
    reason: str | None = None  # why serving_config is None
    table: list[dict[str, Any]]
    # The default's and the winner's sustained rates, and their ratio: from the confirmation
    # (the table's "confirm" rows) when one ran, else from the search.
    default_qps: float
    tuned_qps: float
    gain_vs_default: float | None
    capacity: Capacity
    seconds: float
    synthetic_requests: bool
    tuning: list[ModelTuning] = Field(default_factory=list, exclude=True)  # steps: artifact only
    # The search's best against the default, climbed again interleaved; None when the search
    # chose the default (nothing to confirm). Its reason says which stayed and why.
    confirmation: Confirmation | None = None
    gain_from: Literal["search", "confirmation"] = "search"  # where gain_vs_default comes from


def request_bodies(
    settings: Settings, name: str, version: str, workdir: Path
) -> tuple[list[bytes], bool]:
    """One OIP v2 request per validation sample (the optimize run's ``--data`` when it is an
    ``.npz`` still on disk, else inputs synthesized from the signature); and whether synthetic."""
    from bladeflow.tasks.validate.data import load_npz, synthesize

    artifact, _ = download_version(settings, name, version, workdir / "model")
    mv = mlflow_client(settings).get_model_version(name, version)
    params = json.loads(mv.tags.get(registry.TAG_OPTIMIZE_PARAMS) or "{}")
    data_path = params.get("data")
    synthetic = not (data_path and str(data_path).endswith(".npz") and Path(data_path).is_file())
    data = (
        synthesize(artifact.signature, samples=64)
        if synthetic
        else load_npz(data_path, artifact.signature)
    )
    rows = len(next(iter(data.values())))
    bodies = []
    for i in range(min(rows, 256)):
        inputs = []
        for key, arr in data.items():
            row = np.asarray(arr[i : i + 1])
            kind = _V2_TYPES.get(row.dtype.name)
            if kind is None:
                raise UserInputError(f"input {key!r} has dtype {row.dtype}: not sendable as v2")
            inputs.append(
                {
                    "name": key,
                    "shape": list(row.shape),
                    "datatype": kind,
                    "data": row.ravel().tolist(),
                }
            )
        bodies.append(orjson.dumps({"inputs": inputs}))
    return bodies, synthetic


def _source_onnx(settings: Settings, name: str, version: str) -> tuple[Path | None, str | None]:
    """The unoptimized model to serve as the baseline: the source when it is an ONNX file here,
    else the ONNX the version's optimize run converted it to (run param ``converted_model``)
    when that file is still on this machine."""
    client = mlflow_client(settings)
    mv = client.get_model_version(name, version)
    source = mv.tags.get(registry.TAG_SOURCE, "")
    path = Path(source)
    if source.lower().endswith(".onnx") and path.is_file():
        return path, None
    converted = ""
    if mv.run_id:
        converted = client.get_run(mv.run_id).data.params.get("converted_model", "")
    if converted and Path(converted).is_file():
        return Path(converted), None
    return None, (
        f"the source {source!r} is not an ONNX file on this machine, and the ONNX its optimize "
        f"run converted it to ({converted or 'not recorded'}) is not here either, so the "
        "unoptimized baseline cannot be served for comparison"
    )


def tune_serving(
    settings: Settings,
    name: str,
    version: str,
    *,
    slo_p99_ms: float = 100.0,
    budget_s: float = 300.0,
    target_qps: float = 1000.0,
    source: bool = True,
    workdir: Path,
    say: Say | None = None,
) -> TuneResult:
    """Tune serving for ``name``/``version`` (a number or alias) and measure capacity."""
    t0 = time.monotonic()
    version = resolve_version(settings, name, version, what="version", hint="")
    cores = machine_cores()
    workdir.mkdir(parents=True, exist_ok=True)
    bodies, synthetic = request_bodies(settings, name, version, workdir)
    source_path, reason = _source_onnx(settings, name, version) if source else (None, "off")
    if source_path is not None and budget_s * SOURCE_SHARE < MIN_SEARCH_S:
        source_path, reason = None, _too_short(budget_s)
    share = SOURCE_SHARE if source_path else 0.0
    chosen_model = ServedModel(settings, name, version, "chosen")
    chosen = tune_model(
        chosen_model, bodies, slo_p99_ms, budget_s * (1 - share), workdir, cores=cores, say=say
    )
    tunings = [chosen]
    source_tuning = None
    left = budget_s - (time.monotonic() - t0)
    if source_path is not None and left < MIN_SEARCH_S:
        source_path = None
        reason = (
            f"the version's search left {max(left, 0.0):.0f} s of the {budget_s:g} s budget, "
            f"too little to search the source (at least {MIN_SEARCH_S:g} s)"
        )
    if source_path is not None:
        # The throwaway registry a previous tune of this version left in the same work folder
        # (source_registry refuses to overwrite it, which failed every second tune with exit 2).
        shutil.rmtree(workdir / "source-registry", ignore_errors=True)
        served = source_registry(source_path, f"{name}-source", workdir)
        source_tuning = tune_model(
            served,
            bodies,
            slo_p99_ms,
            max(left, 1.0),
            workdir,
            cores=cores,
            fine=False,
            confirm=False,  # its best only feeds the capacity; the budget goes to its search
            first=[chosen.best.config] if chosen.best else [],
            say=say,
        )
        tunings.append(source_tuning)
    capacity = _capacity(chosen, source_tuning, cores, target_qps, slo_p99_ms, reason)
    best, default = chosen.best, chosen.default
    config = None
    if best is not None:
        config = {
            **best.config.model_dump(),
            "slo_p99_ms": slo_p99_ms,
            "sustained_qps": round(best.sustained_qps, 1),
            "default_qps": round(default.sustained_qps, 1) if default else None,
            "gain_from": _gain_from(chosen),
            "cores": cores,
            "tuned_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    default_qps = default.sustained_qps if default else 0.0
    tuned_qps = best.sustained_qps if best else 0.0
    return TuneResult(
        name=name,
        version=version,
        slo_p99_ms=slo_p99_ms,
        budget_s=budget_s,
        serving_config=config,
        reason=None if config is not None else _no_config(chosen, budget_s, slo_p99_ms),
        table=[{"model": t.label, **r.row()} for t in tunings for r in t.results],
        default_qps=default_qps,
        tuned_qps=tuned_qps,
        gain_vs_default=round(tuned_qps / default_qps, 3) if default_qps else None,
        capacity=capacity,
        seconds=round(time.monotonic() - t0, 1),
        synthetic_requests=synthetic,
        tuning=tunings,
        confirmation=chosen.confirmation,
        gain_from=_gain_from(chosen),
    )


def _gain_from(tuning: ModelTuning) -> Literal["search", "confirmation"]:
    c = tuning.confirmation
    return "confirmation" if c is not None and c.rounds else "search"


def _too_short(budget_s: float) -> str:
    need = math.ceil(MIN_SEARCH_S / SOURCE_SHARE)
    return (
        f"a {budget_s:g} s budget leaves no time for the source's search as well (give at least "
        f"{need} s)"
    )


def _no_config(tuning: ModelTuning, budget_s: float, slo_ms: float) -> str:
    """Why a search chose no configuration: no time, every one failed, or none held the SLO."""
    if not tuning.results:
        return (
            f"the {budget_s:g} s budget measured no configuration (one takes at least "
            f"{MIN_SEARCH_S:g} s with its server's start-up)"
        )
    errors = [r.error for r in tuning.results if r.error]
    if len(errors) == len(tuning.results):
        return f"no configuration could be measured: {errors[0]}"
    return f"no configuration sustained a rate within p99 <= {slo_ms:g} ms"


def _capacity(
    chosen: ModelTuning,
    source: ModelTuning | None,
    cores: int,
    target_qps: float,
    slo_ms: float,
    reason: str | None,
) -> Capacity:
    def row(t: ModelTuning) -> CapacityRow | None:
        b = t.best
        if b is None or b.sustained_qps <= 0:
            return None
        per_core = b.sustained_qps / cores
        return CapacityRow(
            label=t.label,
            version=t.version,
            serving_config=b.config.model_dump(),
            sustained_qps=round(b.sustained_qps, 1),
            qps_per_core=round(per_core, 2),
            cores_needed=round(target_qps / per_core, 2),
            server_cpu_cores=round(b.at_sustained.server_cpu_cores, 2) if b.at_sustained else None,
        )

    a, s = row(chosen), row(source) if source else None
    saved = None
    if a and s:
        saved = round(100.0 * (1.0 - a.cores_needed / s.cores_needed), 1)
    elif source is not None and s is None:
        reason = f"the source sustained no tried rate within the {slo_ms:g} ms p99"
    if a is None:
        reason = f"no configuration of the version sustained a rate within {slo_ms:g} ms p99"
    return Capacity(
        target_qps=target_qps,
        slo_p99_ms=slo_ms,
        cores=cores,
        chosen=a,
        source=s,
        saved_percent=saved,
        reason=None if saved is not None else reason,
    )


# -- records -----------------------------------------------------------------------------------


def table_markdown(result: TuneResult) -> str:
    cols = [
        "model", "stage", "round", "max_batch_size", "batch_timeout_ms", "workers",
        "intra_op_threads", "sustained_qps", "client_qps", "client_p50_ms", "client_p99_ms",
        "server_qps", "server_p50_ms", "server_p99_ms", "server_cpu_cores",
    ]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result.table:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def capacity_markdown(result: TuneResult) -> str:
    c = result.capacity
    lines = [
        CAPACITY_HEADING,
        "",
        f"Tuned by `bladeflow tune-serving` at p99 <= {c.slo_p99_ms:g} ms on {c.cores} core(s) "
        f"(server and load generator shared them); target {c.target_qps:g} requests/s.",
        "",
        "| model | sustained QPS | QPS per core | cores for target | server CPU (cores) |",
        "|---|---|---|---|---|",
    ]
    for r in (c.source, c.chosen):
        if r is not None:
            lines.append(
                f"| {r.label} (v{r.version}) | {r.sustained_qps:g} | {r.qps_per_core:g} | "
                f"{r.cores_needed:g} | {r.server_cpu_cores} |"
            )
    lines.append("")
    if c.saved_percent is not None:
        lines.append(f"Resources saved: **{c.saved_percent:g} %** of the cores.")
    if c.reason:
        lines.append(f"Not measured: {c.reason}.")
    if result.gain_vs_default:
        lines.append(
            f"Tuned configuration vs the defaults: x{result.gain_vs_default:g} the sustained rate "
            f"(from the {result.gain_from})."
        )
    if result.confirmation is not None:
        lines.append(f"Confirmation: {result.confirmation.reason}.")
    return "\n".join(lines) + "\n"


def plot(result: TuneResult, path: Path) -> Path:
    """Client p99 against offered rate, one line per configuration; the SLO as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in result.tuning:
        for r in t.results:
            if r.steps:
                steps = sorted(r.steps, key=lambda s: s.rate)
                p99 = [
                    s.client_p99_ms if math.isfinite(s.client_p99_ms) else math.nan for s in steps
                ]
                label = f"{t.label}: b{r.config.max_batch_size} {r.config.batch_timeout_ms:g}ms "
                label += f"w{r.config.workers}"
                if r.round is not None:
                    label += f" confirm {r.round}"
                ax.plot([s.rate for s in steps], p99, marker="o", label=label)
    ax.axhline(result.slo_p99_ms, color="red", linestyle="--", label="SLO")
    ax.set_xlabel("offered rate (requests/s, open loop)")
    ax.set_ylabel("client p99 (ms, from scheduled time)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def record(settings: Settings, result: TuneResult, folder: Path) -> list[str]:
    """Write the tag, the artifacts (``serving_tune/`` of the version's run) and the capacity
    section of the version description; return what was written."""
    c = mlflow_client(settings)
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(table_markdown(result) + "\n\n" + capacity_markdown(result))
    full = result.model_dump(mode="json")
    full["tuning"] = [t.model_dump(mode="json") for t in result.tuning]
    (folder / "tune.json").write_text(json.dumps(full, indent=2))
    plot(result, folder / "qps_vs_p99.png")
    if result.serving_config is not None:
        c.set_model_version_tag(
            result.name, result.version, registry.TAG_SERVING_CONFIG,
            json.dumps(result.serving_config, sort_keys=True),
        )  # fmt: skip
        written.append(f"tag {registry.TAG_SERVING_CONFIG}")
    mv = c.get_model_version(result.name, result.version)
    if mv.run_id:
        c.log_artifacts(mv.run_id, str(folder), ARTIFACT_DIR)
        written.append(f"runs:/{mv.run_id}/{ARTIFACT_DIR}")
    description = (mv.description or "").split(CAPACITY_HEADING)[0].rstrip()
    new = (description + "\n\n" if description else "") + capacity_markdown(result)
    c.update_model_version(result.name, result.version, description=new)
    written.append("description")
    return written
