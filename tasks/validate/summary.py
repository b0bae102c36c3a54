"""Human-readable summaries of an optimize run: the latency/accuracy table and a Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bladeflow.core.contract import AccuracyReport, BenchmarkReport, OptimizeResult
from bladeflow.core.outcome import Status
from bladeflow.core.stats import interval_text


def latency_table(result: OptimizeResult) -> list[dict[str, str]]:
    """Rows of the reference system's table: batch, source and optimized latency, speedup.

    The speedup shows its 95% interval over the benchmark's paired rounds beside it
    (``1.42x [1.30\u20131.55]``); a result without one (an older run) shows the ratio alone.
    """
    worst_cos = min((a.min_cosine for a in result.accuracy.values()), default=1.0)
    worst_abs = max((a.max_abs_error for a in result.accuracy.values()), default=0.0)
    rows = []
    for bs, chosen in sorted(result.latency_ms["chosen"].items()):
        src = result.latency_ms["source"][bs]
        rows.append(
            {
                "batch": str(bs),
                "source p50 ms": f"{src.p50_ms:.3f}",
                "optimized p50 ms": f"{chosen.p50_ms:.3f}",
                "optimized p99 ms": f"{chosen.p99_ms:.3f}",
                SPEEDUP_COLUMN: _speedup_cell(result, bs),
                "throughput /s": f"{chosen.throughput:.0f}",
                "max abs err": f"{worst_abs:.2e}",
                "min cosine": f"{worst_cos:.6f}",
            }
        )
    return rows


SPEEDUP_COLUMN = "speedup [lo\u2013hi]"  # ratio and its 95% interval (bladeflow.core.stats)


def _speedup_cell(result: OptimizeResult, bs: int) -> str:
    ratio = f"{result.speedup[bs]:.2f}x"
    ci = result.speedup_ci.get(bs)
    return ratio if ci is None else f"{ratio} {interval_text(*ci)}"


def render_table(rows: list[dict[str, str]]) -> str:
    """Plain-text table with aligned columns."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = "  ".join(c.rjust(width[c]) for c in cols)
    sep = "  ".join("-" * width[c] for c in cols)
    body = ["  ".join(r[c].rjust(width[c]) for c in cols) for r in rows]
    return "\n".join([line, sep, *body])


def candidate_rows(
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport | None,
    chosen: str | None,
    objective_batch: int,
) -> list[dict[str, Any]]:
    """One row per candidate: gate verdict, worst error, objective latency, decision."""
    rows = []
    for name, acc in accuracy.items():
        stats = bench.models.get(name, {}).get(objective_batch) if bench else None
        if name == chosen:
            decision = "chosen: best on the objective among those that passed"
        elif acc.status is Status.SKIPPED:
            decision = f"skipped here: {acc.reason}"
        elif not acc.passed:
            decision = f"rejected: {acc.reason}"
        elif bench and name not in bench.models and acc.reason:
            decision = f"passed the gate, {acc.reason}"  # e.g. screened out before the full run
        elif bench and (why := bench.slower_than(name, "baseline", skip=[objective_batch])):
            decision = f"passed the gate, not eligible: {why}"
        else:
            decision = "passed the gate, slower than the chosen one"
        rows.append(
            {
                "candidate": name,
                "gate": GATE_LABEL[acc.status],
                "max_abs_error": worst_abs_error(acc),
                "min_cosine": worst_cosine(acc),
                f"p50_ms@{objective_batch}": stats.p50_ms if stats else None,
                "decision": decision,
            }
        )
    return rows


GATE_LABEL = {Status.OK: "pass", Status.FAILED: "FAIL", Status.SKIPPED: "skipped"}


def candidates_markdown(
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport | None,
    chosen: str | None,
    objective_batch: int,
) -> str:
    """The candidate table as Markdown."""
    rows = candidate_rows(accuracy, bench, chosen, objective_batch)
    cols = [
        "candidate",
        "gate",
        "max_abs_error",
        "min_cosine",
        f"p50_ms@{objective_batch}",
        "decision",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_fmt(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport | None,
    chosen: str | None,
    objective_batch: int,
    path: Path,
) -> Path | None:
    """PNG of latency vs worst error for every benchmarked candidate; the chosen one marked."""
    if bench is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, acc in accuracy.items():
        stats = bench.models.get(name, {}).get(objective_batch)
        if stats is None:
            continue
        err = max(worst_abs_error(acc), 1e-12)  # log axis: exact models sit at the floor
        style = {"marker": "*", "s": 180, "color": "tab:red"} if name == chosen else {"s": 50}
        ax.scatter([stats.p50_ms], [err], **style)
        ax.annotate(
            name, (stats.p50_ms, err), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    ax.set_xlabel(f"p50 latency at batch {objective_batch} (ms)")
    ax.set_ylabel("max abs error vs source (log)")
    ax.set_yscale("log")
    ax.set_title("Candidates: latency vs error (star = chosen)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def worst_abs_error(acc: AccuracyReport) -> float:
    return max((o.max_abs_error for o in acc.outputs.values()), default=float("nan"))


def worst_cosine(acc: AccuracyReport) -> float:
    return min((o.min_cosine for o in acc.outputs.values()), default=float("nan"))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}" if 0.001 <= abs(value) < 1000 else f"{value:.3g}"
    return str(value)


def summary_markdown(result: OptimizeResult, candidates_md: str, source: str) -> str:
    """The report stored with the MLflow run and used as the version description."""
    head = (
        "> Accuracy was judged on generated inputs (random values from the signature, or built-in "
        "texts for a model with a tokenizer), not your data. Pass --data for a real verdict.\n\n"
        if result.synthetic_data
        else ""
    )
    rows = latency_table(result)
    cols = list(rows[0]) if rows else []
    table = "\n".join(
        ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        + ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    )
    recipe = " -> ".join(s.name for s in result.recipe) or "(none)"
    return (
        f"{head}# bladeflow optimize: {result.name}\n\n"
        f"Source: `{source}`  \nChosen: **{result.candidate}** ({recipe})\n\n"
        f"## Latency (ms, median of interleaved rounds)\n\n{table}\n\n"
        f"## Candidates\n\n{candidates_md}\n"
    )
