"""How long a `bladeflow optimize` waits before its first task runs: cold vs warm orchestration.

Modes, each on a fresh BLADEFLOW_HOME with a tiny model (so the flow itself takes seconds):
- ephemeral: Prefect's temporary server per command (BLADEFLOW_ORCHESTRATION=ephemeral);
- local, cold: the first command of a home starts the local Prefect server;
- local, warm: later commands reuse it.
Measured from process start to the CLI's "convert: started" progress line, and in total.

    .venv/bin/python -m bench.cli_start --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _model(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from tests import models

    src = models.mlp(folder / "mlp.onnx", features=8)
    data = folder / "val.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    return src, data


def run_once(home: Path, src: Path, data: Path, mode: str, name: str) -> tuple[float, float]:
    """(seconds to the first task, seconds in all) for one `bladeflow optimize`."""
    env = {**os.environ, "BLADEFLOW_HOME": str(home), "BLADEFLOW_ORCHESTRATION": mode}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "bladeflow.app.cli", "optimize", str(src), "-n", name]
    cmd += ["--data", str(data), "--bench-rounds", "2", "--bench-iterations", "3", "-b", "1"]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    first = float("nan")
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("convert: started") and first != first:
            first = time.monotonic() - started
    if proc.wait() != 0:
        raise RuntimeError(f"{mode} run failed (exit {proc.returncode})")
    return first, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {
        "ephemeral": [],
        "local cold": [],
        "local warm": [],
    }
    with tempfile.TemporaryDirectory(prefix="bladeflow-cli-start-") as tmp:
        base = Path(tmp)
        src, data = _model(base)
        for i in range(args.repeats):  # interleaved: ephemeral, cold, warm, ephemeral, ...
            rows["ephemeral"].append(run_once(base / f"e{i}", src, data, "ephemeral", f"e{i}"))
            home = base / f"l{i}"
            rows["local cold"].append(run_once(home, src, data, "local", f"l{i}"))
            rows["local warm"].append(run_once(home, src, data, "local", f"l{i}"))
            subprocess.run(
                [sys.executable, "-m", "bladeflow.app.cli", "down", "--grace", "5"],
                env={**os.environ, "BLADEFLOW_HOME": str(home)},
                capture_output=True,
                check=False,
            )
    print("| mode | to first task, median s | whole command, median s | runs |")
    print("|---|---|---|---|")
    for mode, values in rows.items():
        firsts = statistics.median(v[0] for v in values)
        totals = statistics.median(v[1] for v in values)
        print(f"| {mode} | {firsts:.1f} | {totals:.1f} | {len(values)} |")


if __name__ == "__main__":
    main()
