"""The accuracy budget of a run, resolved on the model: what each output is, and its limits.

:func:`resolve_budget` looks at the converted ONNX graph (which op produces each output) and at
the source's outputs on the validation data (:func:`~bladeflow.core.budget.output_kind`), and
turns the run's budget into the gate's policy: the same one validation and accuracy recovery use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bladeflow.core.budget import (
    AccuracyBudget,
    OutputFacts,
    describe_policy,
    output_facts,
)
from bladeflow.core.policy import TolerancePolicy

# Ops that only move values around: the op "producing" an output is the one before them.
_PASS_THROUGH = frozenset(
    {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast", "Slice"}
)


@dataclass(frozen=True)
class ResolvedBudget:
    """The policy of a run and how it came about, for the console, the log and MLflow."""

    policy: TolerancePolicy
    facts: dict[str, OutputFacts]
    source: str  # "given" (--accuracy) or "default" (auto: each output's kind)
    synthetic: bool = False

    def describe(self) -> str:
        how = "--accuracy" if self.source == "given" else "default for each output's kind"
        note = " (judged on generated inputs, not your data; pass --data for a real verdict)"
        return f"accuracy budget ({how}): {describe_policy(self.policy, self.facts)}" + (
            note if self.synthetic else ""
        )


def producers(model_path: str | Path) -> dict[str, str]:
    """Output name -> op type that computes it, looking through shape-only ops."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    made_by = {out: node for node in model.graph.node for out in node.output}
    found: dict[str, str] = {}
    for output in model.graph.output:
        name, hops = output.name, 0
        while name in made_by and made_by[name].op_type in _PASS_THROUGH and hops < 16:
            name, hops = made_by[name].input[0], hops + 1
        if name in made_by:
            found[output.name] = made_by[name].op_type
    return found


def resolve_budget(
    budget: AccuracyBudget,
    reference: dict[str, np.ndarray],
    model_path: str | Path | None = None,
    synthetic: bool = False,
) -> ResolvedBudget:
    """The policy ``budget`` stands for on this model and data.

    On synthetic data the kinds come from the source's outputs on those inputs all the same (the
    description says so): names, shapes and bounding ops do not depend on the inputs.

    Raises:
        BudgetError: a limit names an output the model lacks or cannot judge it (exit 2).
    """
    facts = output_facts(reference, producers(model_path) if model_path else None)
    how = "default" if budget.auto else "given"
    return ResolvedBudget(budget.to_policy(facts), facts, how, synthetic)
