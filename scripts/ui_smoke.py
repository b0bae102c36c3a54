"""Drive the Prefect and MLflow UIs in a real browser, as a person would, and take screenshots.

Checks what the operations issue promises: on a running stack (``bladeflow up``) a person opens
the Prefect UI, fills the optimize deployment's parameter form, presses Submit, the run
completes, and the result (version, tags, alias, Pareto plot) shows in the MLflow UI.

Not part of ``make test`` (it needs a browser). Set-up, once, outside the project venv::

    apt-get install chromium            # Debian; any Chromium/Chrome works
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright httpx
    /tmp/pw/bin/python scripts/ui_smoke.py --source /abs/model.onnx --name intent-from-ui

Screenshots go to ``--out`` (default ``.bladeflow/ui-smoke``). Exit status 0 when the run
completed and the MLflow model page lists the version.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefect", default="http://127.0.0.1:4200", help="Prefect UI URL")
    ap.add_argument("--mlflow", default="http://127.0.0.1:5000", help="MLflow UI URL")
    ap.add_argument("--source", required=True, help="model path the worker can read")
    ap.add_argument("--name", required=True, help="registered model name to create")
    ap.add_argument("--browser", default="/usr/bin/chromium", help="Chromium executable")
    ap.add_argument("--out", type=Path, default=Path(".bladeflow/ui-smoke"))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    api = args.prefect.rstrip("/") + "/api"
    dep = httpx.get(f"{api}/deployments/name/optimize/optimize", timeout=30).json()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.browser, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{args.prefect}/deployments/deployment/{dep['id']}/run", wait_until="load")
        page.get_by_text("Source", exact=True).wait_for(timeout=60_000)
        # The form follows OptimizeParams' field order: Source, then Name, are the first two
        # free-text fields.
        fields = page.locator("textarea")
        fields.nth(0).fill(args.source)
        fields.nth(1).fill(args.name)
        page.screenshot(path=str(args.out / "1-prefect-form.png"))
        started = time.time()
        page.get_by_role("button", name="Submit").click()

        body = {"deployments": {"id": {"any_": [dep["id"]]}}}
        ours: list[dict] = []
        while not ours and time.time() - started < 60:
            time.sleep(1)
            runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).json()
            ours = [r for r in runs if r["parameters"]["params"].get("name") == args.name]
        if not ours:
            print("no flow run with our parameters appeared after Submit", file=sys.stderr)
            page.screenshot(path=str(args.out / "2-after-submit.png"))
            return 1
        run = max(ours, key=lambda r: r["created"])
        state = run["state"]["type"]
        while state not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            if time.time() - started > args.timeout:
                print(f"run {run['id']} still {state} after {args.timeout:.0f} s", file=sys.stderr)
                return 1
            time.sleep(3)
            state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=30).json()["state"]["type"]
        print(f"flow run {run['id']}: {state} {time.time() - started:.0f} s after Submit")
        page.goto(f"{args.prefect}/runs/flow-run/{run['id']}", wait_until="load")
        page.wait_for_timeout(4000)
        page.screenshot(path=str(args.out / "2-prefect-run.png"))
        if state != "COMPLETED":
            return 1

        page.goto(f"{args.mlflow}/#/models/{args.name}", wait_until="load")
        page.get_by_text("Version 1").first.wait_for(timeout=60_000)
        page.screenshot(path=str(args.out / "3-mlflow-model.png"))
        alias = httpx.get(
            f"{args.mlflow}/api/2.0/mlflow/registered-models/alias",
            params={"name": args.name, "alias": "candidate"},
            timeout=30,
        ).json()["model_version"]
        mlflow_run = httpx.get(
            f"{args.mlflow}/api/2.0/mlflow/runs/get", params={"run_id": alias["run_id"]}, timeout=30
        ).json()["run"]
        exp = mlflow_run["info"]["experiment_id"]
        page.goto(
            f"{args.mlflow}/#/experiments/{exp}/runs/{alias['run_id']}/artifacts/reports/pareto.png",
            wait_until="load",
        )
        page.wait_for_timeout(6000)
        page.screenshot(path=str(args.out / "4-mlflow-pareto.png"))
        browser.close()
    print(f"version {alias['version']} has alias candidate; screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
