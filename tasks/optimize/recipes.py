"""Recipes (chains of passes) and the presets that decide which recipes are tried.

The unoptimized model is always a candidate (the ``baseline`` recipe), so selection can never pick
something slower or less accurate than what the user brought.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from bladeflow.contract import Candidate, ModelArtifact, PassRecord, SessionConfig
from bladeflow.errors import UserInputError
from tasks.optimize.base import get_pass

BASELINE = "baseline"


class Recipe(BaseModel):
    """A named chain of passes and the session configuration to run the result with."""

    name: str
    passes: list[PassRecord] = Field(default_factory=list)
    session: SessionConfig = Field(default_factory=SessionConfig)


PRESETS: dict[str, list[Recipe]] = {
    "cpu": [
        Recipe(name="ort-extended", passes=[PassRecord(name="ort_graph",
                                                       config={"level": "extended"})]),
        Recipe(name="ort-all", passes=[PassRecord(name="ort_graph", config={"level": "all"})]),
    ],
}


def parse_passes(spec: str) -> list[Recipe]:
    """Parse ``--passes``: recipes separated by ``,``, passes in a chain by ``+``, options by ``:``.

    Example: ``ort_graph:level=all,ort_graph:level=basic`` -> two one-pass recipes.
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
        recipes.append(Recipe(name=chunk.replace(":", "-").replace("=", "").replace(";", "-"),
                              passes=records))
    if not recipes:
        raise UserInputError(f"--passes {spec!r} names no pass")
    return recipes


def resolve_recipes(preset: str = "cpu", passes: str | None = None) -> list[Recipe]:
    """The recipes to try: baseline first, then ``--passes`` if given, else the preset's."""
    if passes:
        chosen = parse_passes(passes)
    else:
        try:
            chosen = PRESETS[preset]
        except KeyError:
            raise UserInputError(
                f"unknown preset {preset!r}; available: {', '.join(PRESETS)}"
            ) from None
    return [Recipe(name=BASELINE), *(r for r in chosen if r.name != BASELINE)]


def build_candidate(recipe: Recipe, model: ModelArtifact, workdir: Path) -> Candidate:
    """Apply ``recipe``'s passes in order to ``model``; each step writes into its own folder."""
    artifact, session = model, recipe.session
    applied: list[PassRecord] = []
    for index, record in enumerate(recipe.passes):
        step = get_pass(record.name, record.config)
        artifact = step.run(artifact, workdir / recipe.name / f"{index:02d}-{record.name}")
        session = step.session_config(session)
        applied.append(step.record())
    return Candidate(name=recipe.name, artifact=artifact, session=session, recipe=applied)


def _scalar(value: str) -> object:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return {"true": True, "false": False}.get(value.lower(), value)
