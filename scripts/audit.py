"""Dependency audit: pip-audit over the installed packages; "nothing audited" is not "clean".

``make audit`` runs it. pip-audit reports "No known vulnerabilities found" even when it could not
look a single package up (e.g. a PyPI mirror without the per-version JSON pages, or no route to
the OSV service); this wrapper counts what was actually audited and fails when that is nothing.

Exit status: 0 audited with no known vulnerability; 1 vulnerabilities found (listed with the
fixed versions); 3 too little could be audited to say anything (the reason is printed).
"""

from __future__ import annotations

import json
import subprocess
import sys


def main() -> int:
    cmd = [sys.executable, "-m", "pip_audit", "--progress-spinner", "off", "--skip-editable"]
    proc = subprocess.run([*cmd, "-f", "json"], capture_output=True, text=True, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        print(proc.stderr or proc.stdout, file=sys.stderr)
        return 3
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if "skip_reason" in d]
    audited = [d for d in deps if "skip_reason" not in d]
    vulnerable = [d for d in audited if d.get("vulns")]
    for d in vulnerable:
        for v in d["vulns"]:
            fixes = ", ".join(v.get("fix_versions") or []) or "no fixed release"
            print(f"{d['name']} {d['version']}: {v['id']} (fixed in: {fixes})")
    print(f"audited {len(audited)} of {len(deps)} installed packages; skipped {len(skipped)}")
    if skipped and len(audited) < len(deps) / 2:
        print(
            f"too few packages could be audited ({skipped[0]['skip_reason']}). The vulnerability "
            "service (PyPI's JSON API per version, or OSV with --vulnerability-service osv) is "
            "not reachable from here: run `make audit` where it is.",
            file=sys.stderr,
        )
        return 3
    return 1 if vulnerable else 0


if __name__ == "__main__":
    raise SystemExit(main())
