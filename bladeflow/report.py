"""Human-readable summaries of an optimize run: the latency/accuracy table and a Markdown report."""

from __future__ import annotations

from bladeflow.contract import AccuracyReport, BenchmarkReport, OptimizeResult


def latency_table(result: OptimizeResult) -> list[dict[str, str]]:
    """Rows of the reference system's table: batch, source and optimized latency, speedup."""
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
                "speedup": f"{result.speedup[bs]:.2f}x",
                "throughput /s": f"{chosen.throughput:.0f}",
                "max abs err": f"{worst_abs:.2e}",
                "min cosine": f"{worst_cos:.6f}",
            }
        )
    return rows


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


def candidates_markdown(
    accuracy: dict[str, AccuracyReport],
    bench: BenchmarkReport | None,
    chosen: str | None,
    objective_batch: int,
) -> str:
    """One row per candidate: gate verdict, worst error, latency at the objective batch."""
    lines = [
        "| candidate | accuracy gate | max abs error | min cosine "
        f"| p50 ms @ batch {objective_batch} | decision |",
        "|---|---|---|---|---|---|",
    ]
    for name, acc in accuracy.items():
        worst_abs = max((o.max_abs_error for o in acc.outputs.values()), default=float("nan"))
        worst_cos = min((o.min_cosine for o in acc.outputs.values()), default=float("nan"))
        stats = bench.models.get(name, {}).get(objective_batch) if bench else None
        latency = f"{stats.p50_ms:.3f}" if stats else "-"
        if name == chosen:
            decision = "chosen (fastest that passed)"
        elif not acc.passed:
            decision = f"rejected: {acc.reason}"
        else:
            decision = "passed, slower"
        lines.append(
            f"| {name} | {'pass' if acc.passed else 'FAIL'} | {worst_abs:.3g} | {worst_cos:.6f} "
            f"| {latency} | {decision} |"
        )
    return "\n".join(lines)


def summary_markdown(result: OptimizeResult, candidates_md: str, source: str) -> str:
    """The report stored with the MLflow run and used as the version description."""
    head = (
        "> Accuracy was judged on synthetic inputs generated from the signature; they cannot "
        "judge quantization. Pass --data for a real verdict.\n\n"
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
