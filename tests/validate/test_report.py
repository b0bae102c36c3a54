"""The report folder: Markdown with the measured numbers, HTML, PNG plots, GX results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bladeflow.core.contract import BenchmarkReport, LatencyStats, PassRecord, SessionConfig
from bladeflow.core.policy import TolerancePolicy
from bladeflow.tasks.validate.checks import check_data
from bladeflow.tasks.validate.gate import accuracy_gate
from bladeflow.tasks.validate.report import (
    SYNTHETIC_WARNING,
    RunResults,
    version_description,
    write_report,
)
from tests.validate.conftest import MLP_SIGNATURE

PNG = b"\x89PNG\r\n\x1a\n"


def _stats(bs: int, p50: float) -> LatencyStats:
    return LatencyStats(
        batch_size=bs,
        p50_ms=p50,
        p90_ms=p50 * 1.1,
        p99_ms=p50 * 1.5,
        mean_ms=p50,
        throughput=bs * 1000 / p50,
        iterations=20,
    )


def _results(synthetic: bool) -> RunResults:
    rng = np.random.default_rng(0)
    ref = {"y": rng.standard_normal((40, 4)).astype(np.float32)}
    good = {"y": ref["y"] + np.float32(3e-5)}
    bad = {"y": ref["y"] * 1.5}
    policy = TolerancePolicy.preset("fp32")
    bench = BenchmarkReport(
        models={
            "source": {1: _stats(1, 2.0), 8: _stats(8, 10.0)},
            "ort-all": {1: _stats(1, 1.0), 8: _stats(8, 4.0)},
        }
    )
    _, data_suite = check_data(
        {"x": rng.standard_normal((40, 8)).astype(np.float32)}, MLP_SIGNATURE
    )
    return RunResults(
        name="mlp-demo",
        source="/models/mlp.onnx",
        synthetic_data=synthetic,
        accuracy={
            "ort-all": accuracy_gate("ort-all", good, ref, policy, synthetic),
            "broken": accuracy_gate("broken", bad, ref, policy, synthetic),
        },
        chosen="ort-all",
        recipe=[PassRecord(name="ort_graph", config={"level": "all"})],
        session=SessionConfig(),
        benchmark=bench,
        data_description="`val.npz`, 40 samples",
        data_suite=data_suite,
    )


def test_report_folder_has_markdown_html_plots_and_gx(tmp_path: Path):
    # setup
    results = _results(synthetic=False)
    # execute
    files = write_report(tmp_path / "report", results)
    # assert: files
    md = Path(files.markdown).read_text()
    html = Path(files.html).read_text()
    names = sorted(Path(p).name for p in files.plots)
    assert names == ["errors-y.png", "latency.png"]
    assert all(Path(p).read_bytes().startswith(PNG) for p in files.plots)
    assert sorted(Path(p).name for p in files.gx) == [
        "accuracy-broken.json",
        "accuracy-ort-all.json",
        "validation-data.json",
    ]
    assert json.loads(Path(files.gx[0]).read_text())["success"] is True
    assert Path(files.tables[0]).read_text().startswith("sample,y.max_abs_error")
    # assert: measured numbers in the Markdown
    assert md.splitlines()[0].startswith("> Accuracy was judged on the given validation data")
    assert "| 1 | 2.000 | 2.200 | 3.000 | 500.0 | 1.000 | 1.100 | 1.500 | 1000.0 | 2.00x |" in md
    assert "| 8 | 10.000 | 11.000 | 15.000 | 800.0 | 4.000 | 4.400 | 6.000 | 2000.0 | 2.50x |" in md
    assert "### ort-all: **pass**" in md and "### broken: **FAIL**" in md
    worst = results.accuracy["ort-all"].report.outputs["y"].max_abs_error  # type: ignore[union-attr]
    assert f"{worst:.3e}" in md
    assert '`ort_graph` `{"level": "all"}`' in md
    assert "## Hardware" in md and "| onnxruntime |" in md and "great-expectations" in md
    assert "![latency](plots/latency.png)" in md
    assert "<table>" in html and 'src="plots/latency.png"' in html


def test_synthetic_report_says_so_in_its_first_line(tmp_path: Path):
    # setup
    results = _results(synthetic=True)
    results.benchmark = None
    # execute
    files = write_report(tmp_path / "r", results)
    # assert
    md = Path(files.markdown).read_text()
    assert md.splitlines()[0] == SYNTHETIC_WARNING
    assert "not your data" in md.splitlines()[0] and "--data" in md.splitlines()[0]
    assert [Path(p).name for p in files.plots] == ["errors-y.png"]
    assert "Not measured" in md


def test_version_description_fits_mlflow_and_keeps_the_first_line():
    # setup
    md = SYNTHETIC_WARNING + "\n\n# r\n\n![latency](plots/latency.png)\n" + "## s\n" + "x" * 9000
    # execute
    short = version_description(md)
    # assert
    assert len(short) <= 4900 and short.splitlines()[0] == SYNTHETIC_WARNING
    assert "plots/latency.png" not in short and "shortened" in short
    assert version_description("# small\n") == "# small\n"
