"""The run report people read: Markdown (and HTML), PNG plots and the GX results, in one folder.

:func:`write_report` writes ``report.md``, ``report.html``, ``plots/*.png``, ``gx/*.json`` and
``tables/*.csv`` (the per-sample error tables) from a :class:`RunResults`. The Markdown's first
line says whether accuracy was judged on synthetic inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from bladeflow.core.contract import (
    AccuracyReport,
    BenchmarkReport,
    LatencyStats,
    PassRecord,
    SessionConfig,
)
from bladeflow.core.environment import hardware, tool_versions
from bladeflow.core.text import safe_name
from bladeflow.tasks.validate.gate import GateOutcome, StepError
from bladeflow.tasks.validate.gx import SuiteResult
from bladeflow.tasks.validate.labels import LABEL_AGREE

SYNTHETIC_WARNING = (
    "> **Accuracy was judged on generated inputs, not your data**: random values from the model "
    "signature, or bladeflow's built-in English texts for a model with a tokenizer. They judge "
    "quantization only as far as your traffic looks like them. Pass `--data` for a real verdict."
)


@dataclass
class RunResults:
    """What one optimize run measured, as the report needs it."""

    name: str
    source: str
    synthetic_data: bool
    accuracy: dict[str, GateOutcome | AccuracyReport]
    chosen: str | None = None
    recipe: list[PassRecord] = field(default_factory=list)
    session: SessionConfig | None = None
    benchmark: BenchmarkReport | None = None
    source_label: str = "source"
    chain: list[StepError] = field(default_factory=list)
    data_description: str = ""
    data_suite: SuiteResult | None = None


class ReportFiles(BaseModel):
    """Where :func:`write_report` put everything."""

    folder: str
    markdown: str
    html: str
    plots: list[str]
    gx: list[str]
    tables: list[str]


def write_report(folder: Path, results: RunResults) -> ReportFiles:
    """Write the whole report folder and return its files.

    The lead logs ``folder`` to MLflow, uses ``report.md`` as the version description and as a
    Prefect markdown artifact.
    """
    folder = Path(folder)
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    gx_files: list[str] = []
    tables: list[str] = []
    if results.data_suite is not None:
        gx_files.append(str(results.data_suite.save(folder / "gx" / "validation-data.json")))
    for cand, acc in results.accuracy.items():
        if isinstance(acc, GateOutcome):
            gx_files.append(str(acc.suite.save(folder / "gx" / f"accuracy-{safe_name(cand)}.json")))
            path = folder / "tables" / f"accuracy-{safe_name(cand)}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            acc.table.to_csv(path, index_label="sample")
            tables.append(str(path))
    plots = write_plots(folder / "plots", results)
    md = report_markdown(results, [Path(p).relative_to(folder).as_posix() for p in plots])
    md_path = folder / "report.md"
    md_path.write_text(md)
    html_path = folder / "report.html"
    html_path.write_text(markdown_to_html(md, f"bladeflow report: {results.name}"))
    return ReportFiles(
        folder=str(folder),
        markdown=str(md_path),
        html=str(html_path),
        plots=[str(p) for p in plots],
        gx=gx_files,
        tables=tables,
    )


def report_markdown(results: RunResults, plots: list[str] | None = None) -> str:
    """The report as Markdown; ``plots`` are image paths relative to the report."""
    plots = plots or []
    first = (
        SYNTHETIC_WARNING
        if results.synthetic_data
        else f"> Accuracy was judged on the given validation data{_data_suffix(results)}."
    )
    parts = [first, "", f"# bladeflow report: {results.name}", ""]
    parts += [f"- **Source:** `{results.source}`"]
    if results.chosen:
        parts += [f"- **Chosen candidate:** {results.chosen}"]
    if results.data_description:
        parts += [f"- **Validation data:** {results.data_description}"]
    parts += ["", "## Recipe", "", *_recipe_lines(results), ""]
    parts += ["## Latency", "", *_latency_lines(results)]
    parts += [f"![{Path(p).stem}]({p})" for p in plots if Path(p).stem.startswith("latency")]
    parts += ["", "## Accuracy", ""]
    for cand, acc in results.accuracy.items():
        parts += _accuracy_lines(cand, acc)
    parts += [f"![{Path(p).stem}]({p})" for p in plots if Path(p).stem.startswith("errors")]
    if results.chain:
        parts += ["", "## Error per pass", "", *_chain_lines(results.chain)]
    if results.data_suite is not None:
        parts += ["", "## Validation data checks (Great Expectations)", ""]
        parts += _suite_lines(results.data_suite)
    parts += ["", "## Hardware", "", *_kv_lines(hardware())]
    parts += ["", "## Tool versions", "", *_kv_lines(tool_versions())]
    return "\n".join(parts) + "\n"


def version_description(md: str, limit: int = 4900) -> str:
    """The report shortened for an MLflow version description (a 5000-character column).

    Image links are dropped (they are relative to the report folder); when still too long, the
    text is cut at a section boundary with a pointer to the full report.
    """
    text = "\n".join(line for line in md.splitlines() if not line.startswith("![")) + "\n"
    if len(text) <= limit:
        return text
    note = "\n\n_(shortened: the full report is report.md in the run's artifacts)_\n"
    cut = text.rfind("\n## ", 0, limit - len(note))
    cut = cut if cut > 0 else limit - len(note)
    return text[:cut].rstrip() + note


def latency_rows(bench: BenchmarkReport, source: str, optimized: str) -> list[dict[str, str]]:
    """The reference system's table: batch x source/optimized p50/p90/p99 and QPS, speedup."""
    src, opt = bench.models.get(source, {}), bench.models.get(optimized, {})
    rows = []
    for bs in sorted(set(src) | set(opt)):
        row = {"batch": str(bs)}
        row.update(_stats_cells("source", src.get(bs)))
        row.update(_stats_cells("optimized", opt.get(bs)))
        s, o = src.get(bs), opt.get(bs)
        row["speedup (p50)"] = f"{s.p50_ms / o.p50_ms:.2f}x" if s and o and o.p50_ms else "-"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols = list(rows[0])
    return [
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows),
    ]


def markdown_to_html(md: str, title: str) -> str:
    """Render with the ``markdown`` package (installed with MLflow); tables and code blocks on."""
    import markdown

    body = markdown.markdown(md, extensions=["tables", "fenced_code"])
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .5em;"
        "text-align:right}blockquote{background:#fff4e5;border-left:4px solid #f0a020;"
        "margin:0;padding:.5em 1em}img{max-width:48em}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_plots(folder: Path, results: RunResults) -> list[Path]:
    """latency.png (p50 vs batch, source vs optimized, p90-p99 band) and errors-<output>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    bench = results.benchmark
    if bench is not None and bench.models:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [results.source_label] + ([results.chosen] if results.chosen else [])
        for label in dict.fromkeys(labels):
            per = bench.models.get(label)
            if not per:
                continue
            sizes = sorted(per)
            p50 = [per[b].p50_ms for b in sizes]
            (line,) = ax.plot(sizes, p50, marker="o", label=f"{label} p50")
            ax.plot(
                sizes,
                [per[b].p99_ms for b in sizes],
                linestyle="--",
                color=line.get_color(),
                alpha=0.6,
                label=f"{label} p99",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # one slow p99 must not flatten every other line
        ax.set_xticks(sorted({b for p in bench.models.values() for b in p}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch (ms)")
        ax.set_title(f"{results.name}: latency vs batch size")
        ax.legend()
        ax.grid(True, alpha=0.3)
        path = folder / "latency.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    outcomes = {c: a for c, a in results.accuracy.items() if isinstance(a, GateOutcome)}
    outputs = sorted({c.rsplit(".", 1)[0] for a in outcomes.values() for c in a.table.columns})
    for out in outputs:
        col = f"{out}.max_abs_error"
        series = {c: a.table[col].to_numpy() for c, a in outcomes.items() if col in a.table}
        if not series:  # a label output: agreement, not an error distribution (in the table)
            continue
        values = np.concatenate(list(series.values()))
        positive = values[values > 0]
        # Log bins shared by all candidates; an error of exactly 0 is drawn at the floor.
        floor = float(positive.min()) / 10 if positive.size else 1e-9
        top = max(float(values.max()), floor * 10)
        bins = np.logspace(np.log10(floor) - 0.1, np.log10(top) + 0.1, 40)
        fig, ax = plt.subplots(figsize=(6, 4))
        for cand, errors in series.items():
            ax.hist(np.clip(errors, floor, None), bins=bins.tolist(), alpha=0.5, label=cand)
        ax.set_xscale("log")
        ax.set_xlabel(f"per-sample max abs error of {out!r} vs source (0 drawn at {floor:.0e})")
        ax.set_ylabel("samples")
        ax.set_title(f"{results.name}: error histogram, output {out}")
        ax.legend()
        path = folder / f"errors-{safe_name(out)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _data_suffix(results: RunResults) -> str:
    return f" ({results.data_description})" if results.data_description else ""


def _recipe_lines(results: RunResults) -> list[str]:
    if not results.recipe:
        lines = ["No passes (the converted model as is)."]
    else:
        lines = [
            f"{i}. `{r.name}` `{json.dumps(r.config, sort_keys=True)}`"
            for i, r in enumerate(results.recipe, 1)
        ]
    if results.session is not None:
        lines += ["", f"ONNX Runtime session: `{results.session.model_dump_json()}`"]
    return lines


def _latency_lines(results: RunResults) -> list[str]:
    bench = results.benchmark
    if bench is None:
        return [
            "Not measured (no candidate passed the accuracy gate, or the stage was skipped).",
            "",
        ]
    optimized = results.chosen or results.source_label
    lines = [
        f"Milliseconds per batch, medians of interleaved rounds; QPS = samples per second. "
        f"Optimized = `{optimized}`.",
        "",
        *markdown_table(latency_rows(bench, results.source_label, optimized)),
        "",
    ]
    for bs, why in sorted(bench.skipped_batch_sizes.items()):
        lines.append(f"- batch {bs} skipped: {why}")
    return lines


def _stats_cells(label: str, s: LatencyStats | None) -> dict[str, str]:
    if s is None:
        return {f"{label} {k}": "-" for k in ("p50", "p90", "p99", "QPS")}
    return {
        f"{label} p50": f"{s.p50_ms:.3f}",
        f"{label} p90": f"{s.p90_ms:.3f}",
        f"{label} p99": f"{s.p99_ms:.3f}",
        f"{label} QPS": f"{s.throughput:.1f}",
    }


def _accuracy_lines(cand: str, acc: GateOutcome | AccuracyReport) -> list[str]:
    report = acc.report if isinstance(acc, GateOutcome) else acc
    verdict = "**pass**" if report.passed else "**FAIL**"
    lines = [f"### {cand}: {verdict}", ""]
    if report.reason:
        lines += [f"Reason: {report.reason}", ""]
    rows = []
    for out, o in report.outputs.items():
        row = {
            "output": out,
            "samples": str(o.samples),
            "failing samples": str(o.failing_samples),
            "max abs error": f"{o.max_abs_error:.3e}",
            "max rel error": f"{o.max_rel_error:.3e}",
            "min cosine": f"{o.min_cosine:.6f}",
            "mean cosine": f"{o.mean_cosine:.6f}",
            "top-1 agreement": "-",
            "label agreement": "-",
        }
        if isinstance(acc, GateOutcome) and f"{out}.top1_agree" in acc.table:
            row["top-1 agreement"] = f"{acc.table[f'{out}.top1_agree'].mean():.4f}"
        if isinstance(acc, GateOutcome) and f"{out}.{LABEL_AGREE}" in acc.table:
            # Labels compare by equality: numeric distances mean nothing for them.
            row.update({k: "-" for k in ("max abs error", "max rel error", "min cosine")})
            row["mean cosine"] = "-"
            row["label agreement"] = f"{acc.table[f'{out}.{LABEL_AGREE}'].mean():.4f}"
        rows.append(row)
    if all(r["label agreement"] == "-" for r in rows):  # no string outputs: no such column
        for r in rows:
            del r["label agreement"]
    lines += [*markdown_table(rows), ""]
    if isinstance(acc, GateOutcome):
        if acc.metric is not None:
            m = acc.metric
            lines += [
                f"Task metric ({m.metric}, with labels): source {m.source:.4f}, candidate "
                f"{m.candidate:.4f}, drop {m.drop:.4g} (allowed {m.allowed_drop:.4g}): "
                f"{'pass' if m.passed else 'FAIL'}",
                "",
            ]
        lines += ["Gate expectations:", "", *_suite_lines(acc.suite), ""]
    return lines


def _suite_lines(suite: SuiteResult) -> list[str]:
    rows = [
        {
            "expectation": c.name.replace("|", "\\|"),
            "GX type": c.expectation,
            "result": "pass" if c.success else "FAIL",
            "observed": c.observed.replace("|", "\\|"),
        }
        for c in suite.checks
    ]
    return markdown_table(rows)


def _chain_lines(chain: list[StepError]) -> list[str]:
    rows = []
    for step in chain:
        for out, vs_src in step.vs_source.items():
            prev = step.vs_previous.get(out)
            rows.append(
                {
                    "step": step.step,
                    "output": out,
                    "max abs error vs source": f"{vs_src.max_abs_error:.3e}",
                    "min cosine vs source": f"{vs_src.min_cosine:.6f}",
                    "max abs error added by this step": f"{prev.max_abs_error:.3e}"
                    if prev
                    else "-",
                    "min cosine vs previous step": f"{prev.min_cosine:.6f}" if prev else "-",
                }
            )
    return markdown_table(rows)


def _kv_lines(values: dict[str, Any]) -> list[str]:
    rows = [
        {"name": k, "value": ", ".join(map(str, v)) if isinstance(v, list) else str(v)}
        for k, v in values.items()
    ]
    return markdown_table(rows)
