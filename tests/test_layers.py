"""The layer rules (docs/ARCHITECTURE.md) hold on this tree, and the checker catches a break."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _checker():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts/check_layers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp


def test_this_tree_follows_the_layer_rules():
    # execute
    violations = _checker().check(ROOT)
    # assert
    assert violations == [], "\n".join(map(str, violations))


@pytest.mark.parametrize(
    ("rel", "text", "needle"),
    [
        ("bladeflow/core/x.py", "from bladeflow.tasks.convert import base\n", "core imports"),
        ("serving/x.py", "import bladeflow.tasks.optimize.base\n", "serving imports"),
        ("tasks/convert/x.py", "from prefect import task\n", "imports Prefect"),
        ("tasks/validate/x.py", "from bladeflow.tasks.optimize import base\n", "may use"),
        ("tasks/release/x.py", "def f():\n    from bladeflow.flows import release\n", "stages"),
        ("bladeflow/app/x.py", "from bladeflow.flows.optimize import optimize_flow\n", "lazily"),
        ("serving/y.py", "import torch\n", "module level"),
    ],
)
def test_a_wrong_import_is_a_violation(tmp_path: Path, rel: str, text: str, needle: str):
    # setup
    root = _tree(tmp_path, {rel: text})
    # execute
    violations = _checker().check(root)
    # assert
    assert len(violations) == 1 and needle in violations[0].message, violations


def test_a_lazy_import_in_the_application_layer_is_allowed(tmp_path: Path):
    # setup
    root = _tree(tmp_path, {"bladeflow/app/x.py": "def f():\n    import bladeflow.flows.nightly\n"})
    # execute / assert
    assert _checker().check(root) == []


@pytest.mark.slow
def test_the_wheel_holds_only_the_bladeflow_package(tmp_path: Path):
    # execute
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    # assert
    (wheel,) = tmp_path.glob("bladeflow-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"bladeflow", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "bladeflow/flows/optimize.py" in names and "bladeflow/tasks/convert/base.py" in names
