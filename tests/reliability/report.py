"""Print the reliability table from the JSON-lines file the suite wrote; optionally update a doc.

    python -m tests.reliability.report RESULTS.jsonl [--doc docs/RELIABILITY.md]

With ``--doc`` the table between ``<!-- reliability-table:start -->`` and
``<!-- reliability-table:end -->`` is replaced by this run's table.
Exit status 1 when any row failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    out = [
        "| # | scenario | fault injected | expected | observed | result |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        observed = "; ".join(r.get("observed") or []) or "-"
        out.append(
            f"| {i} | {_cell(r['name'])} | {_cell(r['fault'])} | {_cell(r['expected'])} "
            f"| {_cell(observed)} | {r['status']} ({r['seconds']} s) |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--doc", type=Path, help="replace the table between the markers in this file")
    args = ap.parse_args(argv)
    if not args.results.exists():
        print(f"{args.results} does not exist: did the suite run?", file=sys.stderr)
        return 2
    rows = [json.loads(ln) for ln in args.results.read_text().splitlines() if ln.strip()]
    text = table(rows)
    failed = sum(r["status"] == "FAIL" for r in rows)
    summary = (
        f"{len(rows)} scenarios, {len(rows) - failed} passed, {failed} failed "
        f"({time.strftime('%Y-%m-%d')}, {platform.node() or 'this machine'}, "
        f"{platform.machine()}, Python {platform.python_version()})"
    )
    print(text)
    print()
    print(summary)
    if args.doc:
        doc = args.doc.read_text()
        if START not in doc or END not in doc:
            print(f"{args.doc} has no {START} ... {END} markers", file=sys.stderr)
            return 2
        head, rest = doc.split(START, 1)
        _, tail = rest.split(END, 1)
        args.doc.write_text(f"{head}{START}\n{summary}\n\n{text}\n{END}{tail}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
