"""Recipes (chains of passes) and the presets that decide which recipes are tried.

The unoptimized model is always a candidate (the ``baseline`` recipe), so selection can never pick
something slower or less accurate than what the user brought.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bladeflow.core import registry
from bladeflow.core.contract import Candidate, ModelArtifact, PassRecord, SessionConfig
from bladeflow.core.environment import hardware
from bladeflow.core.errors import UserInputError
from bladeflow.tasks.optimize.base import PassContext, PassNotApplicable, all_passes, get_pass
from bladeflow.tasks.optimize.presets import PRESETS
from bladeflow.tasks.optimize.recipe import Recipe

BASELINE = "baseline"
# The baseline runs the graph exactly as the accuracy gate's reference does (no load-time
# rewrites), so it always matches its reference bit for bit; the ort_graph recipes carry the
# load-time optimizations as candidates of their own.
BASELINE_SESSION = SessionConfig(graph_optimization_level="disable")
# Steps shared by several recipes are built once here; each recipe's folder then holds
# ``<recipe>/NN-<pass>/model.onnx`` (+ ``pass_config.json``) as links to them.
SHARED = "_shared"
# Passes that run ONNX Runtime's int8 quantizers (mixed_precision too, unless it targets fp16).
_INT8_PASSES = {"int8_dynamic", "int8_static"}
_FOLDER_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()

__all__ = [
    "BASELINE",
    "BASELINE_SESSION",
    "PRESETS",
    "PassContext",
    "PassNotApplicable",
    "Recipe",
    "RecipePlan",
    "build_candidate",
    "int8_blocked",
    "parse_passes",
    "plan_recipes",
    "resolve_recipes",
    "skip_reason",
]


class RecipePlan(BaseModel):
    """The recipes to build here, and those skipped with the reason (e.g. no GPU)."""

    recipes: list[Recipe]
    skipped: dict[str, str] = Field(default_factory=dict)


def parse_passes(spec: str) -> list[Recipe]:
    """Parse ``--passes``: recipes separated by ``,``, passes in a chain by ``+``, options by ``:``.

    Example: ``ort_graph:level=all,ort_graph:level=basic`` -> two one-pass recipes;
    ``transformer_fusion+int8_dynamic:per_channel=true;reduce_range=false`` -> one chain;
    lists are joined by ``|``: ``int8_static:op_types=Conv|MatMul;requires_ops=Conv|``.
    """
    recipes = []
    for chunk in filter(None, (c.strip() for c in spec.split(","))):
        records = []
        for step in chunk.split("+"):
            name, _, opts = step.strip().partition(":")
            config: dict[str, object] = {}
            for item in filter(None, opts.split(";")):
                key, eq, value = item.partition("=")
                if not eq:
                    raise UserInputError(
                        f"bad pass option {item!r} in --passes {spec!r}: write key=value, e.g. "
                        "ort_graph:level=all"
                    )
                config[key.strip()] = _scalar(value.strip())
            get_pass(name, config)  # validate name and config now, not mid-flow
            records.append(PassRecord(name=name, config=config))
        # Names become MLflow metric keys (letters, digits, _ - . / and space): no '+', ':', ';'.
        name = chunk.replace(":", "-").replace("=", "").replace(";", "-").replace("+", "_")
        recipes.append(Recipe(name=name.replace(" ", ""), passes=records))
    if not recipes:
        raise UserInputError(f"--passes {spec!r} names no pass")
    return recipes


def skip_reason(
    recipe: Recipe, hw: dict[str, Any] | None = None, op_types: set[str] | None = None
) -> str | None:
    """Why ``recipe`` cannot be built on ``hw`` (this machine by default), or None.

    With ``op_types`` (the model's, see ``graph_op_types``), recipes that have nothing to do on
    that graph (e.g. the CNN int8 recipe on a model without Conv) are skipped too.
    """
    hw = hardware() if hw is None else hw
    passes = all_passes()
    for record in recipe.passes:
        cls = passes.get(record.name)
        if cls is None:
            return f"unknown pass {record.name!r}"
        why = cls.applicable(hw)
        if why:
            return f"{record.name}: not applicable here: {why}"
        if op_types is not None:
            why = cls(record.config).model_skip_reason(op_types)
            if why:
                return f"{record.name}: not applicable to this model: {why}"
    return None


def plan_recipes(
    preset: str = "cpu",
    passes: str | None = None,
    hw: dict[str, Any] | None = None,
    op_types: set[str] | None = None,
    model: ModelArtifact | None = None,
) -> RecipePlan:
    """Baseline first, then ``--passes`` if given, else the preset's; inapplicable ones skipped.

    ``op_types``: the model's op types; recipes with nothing to do on such a graph are skipped.
    ``model``: the converted model; int8 recipes are skipped when its conversion recorded why
    they cannot work on it (an opset too old for the quantizers, see :func:`int8_blocked`).
    """
    hw = hardware() if hw is None else hw
    if passes:
        chosen = parse_passes(passes)
    else:
        try:
            chosen = PRESETS[preset](hw)
        except KeyError:
            raise UserInputError(
                f"unknown preset {preset!r}; available: {', '.join(PRESETS)}"
            ) from None
    plan = RecipePlan(recipes=[Recipe(name=BASELINE, session=BASELINE_SESSION)])
    for recipe in chosen:
        if recipe.name == BASELINE:
            continue
        why = skip_reason(recipe, hw, op_types) or _int8_skip(recipe, model)
        if why:
            plan.skipped[recipe.name] = why
        else:
            plan.recipes.append(recipe)
    return plan


def resolve_recipes(
    preset: str = "cpu", passes: str | None = None, op_types: set[str] | None = None
) -> list[Recipe]:
    """The recipes to try here: baseline first (see :func:`plan_recipes` for the skipped ones)."""
    return plan_recipes(preset, passes, op_types=op_types).recipes


def build_candidate(
    recipe: Recipe, model: ModelArtifact, workdir: Path, context: PassContext | None = None
) -> Candidate:
    """Apply ``recipe``'s passes in order to ``model``.

    Each step's output lands in ``workdir/<recipe>/NN-<pass>/`` (model + ``pass_config.json``).
    Steps are built in ``workdir/_shared/`` under a hash of the chain that produced them, so
    recipes sharing a prefix (e.g. one int8 model with two session settings) build it once.

    Args:
        recipe: The chain of passes and the starting session config.
        model: The converted model.
        workdir: Folder for the intermediate and final models.
        context: Validation data, reference outputs and tolerance, for passes that need them
            (accuracy recovery, static-quantization calibration).

    Raises:
        PassNotApplicable: a pass cannot run here (no GPU) or needs a context that was not given.
    """
    hw = hardware()
    why = _int8_skip(recipe, model)
    if why:
        raise PassNotApplicable(why)
    artifact, session = model, recipe.session
    applied: list[PassRecord] = []
    chain = hashlib.sha256(model.sha256.encode())
    for index, record in enumerate(recipe.passes):
        step = get_pass(record.name, record.config)
        why = step.applicable(hw)
        if why:
            raise PassNotApplicable(f"pass {record.name!r} is not applicable here: {why}")
        if step.changes_graph:
            resolved = step.record()
            chain.update(json.dumps(resolved.model_dump(), sort_keys=True).encode())
            if context is not None and step.uses_context:
                chain.update(context.model_dump_json().encode())
            shared = workdir / SHARED / f"{index:02d}-{record.name}-{chain.hexdigest()[:10]}"
            # Candidates are built in parallel threads; recipes sharing this step wait for it.
            with _folder_lock(shared):
                artifact = step.run(artifact, shared, context)
            own = _mirror(shared, workdir / recipe.name / f"{index:02d}-{record.name}")
            artifact = artifact.model_copy(update={"path": str(own / "model.onnx")})
        session = step.session_config(session)
        applied.append(step.record())
    return Candidate(name=recipe.name, artifact=artifact, session=session, recipe=applied)


def int8_blocked(model: ModelArtifact) -> str | None:
    """Why int8 passes cannot run on ``model``, as its conversion recorded it (None: they can)."""
    step = model.provenance.step
    reason = step.config.get(registry.PROVENANCE_INT8_BLOCKED) if step is not None else None
    return str(reason) if reason else None


def _int8_skip(recipe: Recipe, model: ModelArtifact | None) -> str | None:
    if model is None:
        return None
    quantizing = [r.name for r in recipe.passes if _quantizes_int8(r)]
    why = int8_blocked(model) if quantizing else None
    return f"{quantizing[0]}: not applicable to this model: {why}" if why else None


def _quantizes_int8(record: PassRecord) -> bool:
    if record.name == "mixed_precision":  # its default precision is int8_dynamic
        return str(record.config.get("precision", "int8_dynamic")).startswith("int8")
    return record.name in _INT8_PASSES


def _mirror(shared: Path, own: Path) -> Path:
    """Make ``own`` hold the files of ``shared`` (hard links; copies across file systems)."""
    own.mkdir(parents=True, exist_ok=True)
    for src in shared.iterdir():
        if not src.is_file():
            continue
        dst = own / src.name
        if dst.exists() and dst.stat().st_ino == src.stat().st_ino:
            continue
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return own


def _folder_lock(folder: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _FOLDER_LOCKS.setdefault(folder.resolve(), threading.Lock())


def _scalar(value: str) -> object:
    if "|" in value:  # a list; a trailing '|' makes a one-item list
        return [_scalar(v.strip()) for v in value.split("|") if v.strip()]
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return {"true": True, "false": False}.get(value.lower(), value)
