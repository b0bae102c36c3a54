"""Importing the validation modules must not load Great Expectations, matplotlib or transformers."""

from __future__ import annotations

import subprocess
import sys


def test_heavy_packages_load_lazily():
    # setup
    code = (
        "import sys\n"
        "import bladeflow.tasks.validate.prepare, bladeflow.tasks.validate.gate\n"
        "import bladeflow.tasks.validate.report, bladeflow.tasks.validate.checks\n"
        "import bladeflow.tasks.validate.sources, bladeflow.tasks.validate.metrics\n"
        "heavy = ['great_expectations', 'matplotlib', 'transformers', 'sklearn', 'torch']\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    # execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # assert
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
