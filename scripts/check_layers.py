"""The layer rules of docs/ARCHITECTURE.md, checked on the source: exit 1 naming each violation.

    core     bladeflow/core/      imports nothing else of bladeflow
    stages   tasks/<stage>/       core, and the stages listed in STAGE_DEPENDS; never Prefect
    flows    flows/               core, stages, flows; the only place with Prefect's @flow/@task
    serving  serving/             core and serving only
    app      bladeflow/app/       anything, but flows/stages/serving only inside functions (lazily)

Every import counts, at module level or inside a function, except where the app rule says so.
Heavy frameworks (torch, tensorflow, tensorrt, transformers, keras) are never imported at module
level anywhere: `import bladeflow.serving` must not pay for them.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Which other stages each stage may use (tasks/<stage> -> stages it names).
STAGE_DEPENDS: dict[str, set[str]] = {
    "convert": {"validate"},  # verification runs the converted model like the gate does
    "optimize": {"validate"},  # accuracy recovery measures error like the gate does
    "validate": set(),
    "benchmark": {"validate", "convert", "register"},  # data batches; incumbent download
    "register": {"validate"},  # the report it logs
    "release": set(),
}
HEAVY = ("torch", "tensorflow", "tensorrt", "transformers", "keras", "tf2onnx")
SOURCES = {"core": "bladeflow/core", "app": "bladeflow/app", "flows": "flows", "serving": "serving"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def layer_of(module: str) -> tuple[str, str] | None:
    """("core"|"stage"|"flows"|"serving"|"app", stage name or "") for a bladeflow module."""
    parts = module.split(".")
    if parts[0] != "bladeflow" or len(parts) < 2:
        return None
    if parts[1] == "tasks":
        return ("stage", parts[2]) if len(parts) > 2 else ("stage", "")
    if parts[1] in {"core", "flows", "serving", "app"}:
        return (parts[1], "")
    return None


def _imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(module, line, at module level) for every absolute import in the file."""
    found: list[tuple[str, int, bool]] = []
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(n, node.lineno, id(node) in top) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names]
    return found


def _decorated_with_prefect(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if isinstance(target, ast.Name) and target.id in {"flow", "task"}:
                    lines.append(node.lineno)
    return lines


def check_file(path: Path, module: str, rel: str) -> list[Violation]:
    """Every rule broken by one file of ``module``'s layer."""
    where = layer_of(module)
    if where is None:
        return []
    layer, stage = where
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[Violation] = []
    for name, line, top in _imports(tree):
        if top and name.split(".")[0] in HEAVY:
            out.append(Violation(rel, line, f"{name} imported at module level (import it lazily)"))
        prefect = layer not in {"flows", "app"} and name.split(".")[0] == "prefect"
        if prefect and not any(v.line == line and "Prefect" in v.message for v in out):
            out.append(Violation(rel, line, f"{layer} imports Prefect ({name}): only flows"))
        target = layer_of(name)
        if target is None:
            continue
        t_layer, t_stage = target
        bad = None
        if layer == "core" and t_layer != "core":
            bad = "core imports nothing else of bladeflow"
        elif layer == "stage" and t_layer in {"flows", "serving", "app"}:
            bad = "stages import core and stages only"
        elif layer == "stage" and t_layer == "stage" and t_stage and t_stage != stage:
            if t_stage not in STAGE_DEPENDS.get(stage, set()):
                allowed = ", ".join(sorted(STAGE_DEPENDS.get(stage, set()))) or "none"
                bad = f"stage {stage} may use stages: {allowed}"
        elif layer == "serving" and t_layer not in {"core", "serving"}:
            bad = "serving imports core and serving only"
        elif layer == "flows" and t_layer in {"serving", "app"}:
            bad = "flows import core, stages and flows only"
        elif layer == "app" and top and t_layer in {"flows", "stage", "serving"}:
            bad = "the application layer imports flows, stages and serving lazily"
        if bad and not any(v.line == line and bad in v.message for v in out):
            out.append(Violation(rel, line, f"{module} -> {name}: {bad}"))
    if layer != "flows":
        for line in _decorated_with_prefect(tree):
            out.append(Violation(rel, line, "@flow/@task outside flows/"))
    return out


def iter_modules(root: Path) -> list[tuple[Path, str, str]]:
    """(file, module name, path shown) for every file of the package, real paths not symlinks."""
    files = []
    roots = {**SOURCES, **{f"tasks/{s}": f"tasks/{s}" for s in STAGE_DEPENDS}}
    for folder in sorted(set(roots.values())):
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            dotted = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            module = dotted if dotted.startswith("bladeflow.") else f"bladeflow.{dotted}"
            files.append((path, module, rel))
    return files


def check(root: Path = ROOT) -> list[Violation]:
    return [v for p, m, rel in iter_modules(root) for v in check_file(p, m, rel)]


def main() -> int:
    violations = check()
    for v in violations:
        print(v)
    if violations:
        print(f"{len(violations)} layer violation(s); the rules are in docs/ARCHITECTURE.md")
        return 1
    print(f"layers: {len(iter_modules(ROOT))} modules follow the rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
