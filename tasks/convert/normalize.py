"""Normalize ONNX graphs from older exporters before anything optimizes them.

Files from older exporters (PyTorch with ``keep_initializers_as_inputs``, Caffe2, opset 7-12) trip
the optimizers downstream: ONNX Runtime cannot constant-fold a weight that is also a graph input
(it may be overridden), so its offline-optimized graphs keep inputs a caller cannot feed, and the
quantizers upgrade old opsets themselves with ONNX's version converter on graphs ONNX Runtime has
already rewritten, where it fails. Normalizing once at convert time, verified numerically against
the original like any pass, gives every recipe the same clean start:

- weights leave the graph inputs (``keep_initializer_inputs`` keeps them, for callers feeding them);
- the IR version is raised to what the graph needs (a weight not listed as an input needs IR >= 4);
- the opset is upgraded to :data:`QUANTIZER_MIN_OPSET` when ONNX's converter can; where it cannot,
  the model keeps its opset and :data:`INT8_BLOCKED` records why the int8 recipes are skipped.

Operators from domains ONNX Runtime does not implement are refused here, by name.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from bladeflow.core import registry
from bladeflow.core.errors import ModelFileError

# ORT's quantizers need opset >= 13 (per-axis QuantizeLinear); below it they run ONNX's version
# converter on their own, after ORT rewrote the graph, which is where legacy models failed.
QUANTIZER_MIN_OPSET = 13
# An initializer that is not also a graph input is valid from IR version 4 on.
_IR_WEIGHTS_NOT_INPUTS = 4
INT8_BLOCKED = registry.PROVENANCE_INT8_BLOCKED


@dataclass
class Normalized:
    """The normalized graph and what was done to it (recorded in the convert step's config)."""

    model: onnx.ModelProto
    removed_inputs: list[str] = field(default_factory=list)
    source_opset: int = 0
    opset: int = 0
    source_ir_version: int = 0
    ir_version: int = 0
    upgrade_error: str | None = None
    int8_blocked: str | None = None
    auto_upgraded: bool = False  # upgraded to QUANTIZER_MIN_OPSET without being asked to

    @property
    def changed(self) -> bool:
        return bool(
            self.removed_inputs
            or self.opset != self.source_opset
            or self.ir_version != self.source_ir_version
        )

    def record(self) -> dict[str, Any]:
        return {
            "initializer_inputs_removed": len(self.removed_inputs),
            "opset": [self.source_opset, self.opset],
            "ir_version": [self.source_ir_version, self.ir_version],
            "opset_upgrade_error": self.upgrade_error,
        }


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are also initializers (weights an old exporter listed as inputs)."""
    weights = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in weights]


def needs_normalization(
    model: onnx.ModelProto, target_opset: int | None, keep_initializer_inputs: bool
) -> bool:
    """Whether :func:`normalize` would change ``model`` (cheap: no conversion is tried)."""
    opset = opset_of(model)
    if target_opset and target_opset != opset:
        return True
    if opset < QUANTIZER_MIN_OPSET:
        return True
    return not keep_initializer_inputs and bool(initializer_inputs(model))


def normalize(
    model: onnx.ModelProto,
    path: Path,
    target_opset: int | None = None,
    keep_initializer_inputs: bool = False,
    no_upgrade_because: str | None = None,
) -> Normalized:
    """Normalize ``model`` (see the module docstring); ``model`` itself is left untouched.

    Args:
        model: The loaded graph (weights loaded).
        path: Its file, for messages.
        target_opset: An opset the user asked for: converted to exactly, or ModelFileError.
        keep_initializer_inputs: Keep weights listed as graph inputs (callers that feed weights).
        no_upgrade_because: Skip the automatic upgrade to :data:`QUANTIZER_MIN_OPSET`, for this
            reason (e.g. ONNX Runtime could not load the upgraded graph).

    Raises:
        ModelFileError: ``target_opset`` was given and ONNX's converter cannot reach it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    result = Normalized(
        model=out,
        source_opset=opset_of(model),
        source_ir_version=int(model.ir_version),
        upgrade_error=no_upgrade_because,
    )
    if not keep_initializer_inputs:
        result.removed_inputs = _drop_initializer_inputs(out)
    if result.removed_inputs or target_opset or result.source_opset < QUANTIZER_MIN_OPSET:
        # Weights outside the inputs need IR >= 4, and the converter's new initializers (e.g.
        # Reshape's shape at opset 5+) would otherwise be invalid on an IR 3 graph.
        out.ir_version = max(out.ir_version, _IR_WEIGHTS_NOT_INPUTS)
    if target_opset:  # the user's choice, even below what the quantizers need
        if target_opset != result.source_opset:
            out = _convert(out, target_opset, path)
    elif no_upgrade_because is None and result.source_opset < QUANTIZER_MIN_OPSET:
        try:
            out = _convert(out, QUANTIZER_MIN_OPSET, path)
            result.auto_upgraded = True
        except ModelFileError as exc:
            result.upgrade_error = str(exc.__cause__ or exc).strip().splitlines()[0][:300]
    result.model = out
    result.opset = opset_of(out)
    result.ir_version = int(out.ir_version)
    if result.opset < QUANTIZER_MIN_OPSET:
        why, fix = (
            (f"it could not be upgraded ({result.upgrade_error})", "re-export the model at")
            if result.upgrade_error
            else (f"target_opset={target_opset} was asked for", "convert it with target_opset")
        )
        result.int8_blocked = (
            f"the model's opset {result.opset} is below {QUANTIZER_MIN_OPSET}, which ONNX "
            f"Runtime's int8 quantizers need, and {why}. For int8, {fix} "
            f"{QUANTIZER_MIN_OPSET} or newer."
        )
    return result


def _drop_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    removed = initializer_inputs(model)
    if removed:
        gone = set(removed)
        kept = [i for i in model.graph.input if i.name not in gone]
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return removed


def _convert(model: onnx.ModelProto, target: int, path: Path) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
        minimum = onnx.helper.find_min_ir_version_for(
            list(converted.opset_import), ignore_unknown=True
        )
        converted.ir_version = max(converted.ir_version, minimum)
        onnx.checker.check_model(converted, full_check=False)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelFileError(
            f"cannot convert {path} from opset {opset_of(model)} to opset {target}: "
            f"{_first_line(exc)}. Pick another target_opset (the ONNX version converter supports "
            "only some operator/opset pairs) or re-export the model at that opset."
        ) from exc
    return converted


def check_runnable_ops(model: onnx.ModelProto, path: Path) -> None:
    """Refuse operators ONNX Runtime has no implementation of, naming op, node and domain.

    Raises:
        ModelFileError: a node's (domain, op type) is neither one ONNX Runtime knows nor a
            function defined in the model.
    """
    import onnxruntime as ort

    known = _ort_operators()
    local = {(f.domain or "", f.name) for f in model.functions}
    for node in _all_nodes(model.graph):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (domain, node.op_type) in known or (domain, node.op_type) in local:
            continue
        where = (
            f"domain {domain!r}, a custom domain ONNX Runtime does not implement"
            if domain not in {d for d, _ in known}
            else f"domain {domain or 'ai.onnx'!r}, which has no such operator"
        )
        raise ModelFileError(
            f"{path}: operator {node.op_type!r} (node {node.name or '<unnamed>'!r}, {where}) "
            f"cannot run in ONNX Runtime {ort.__version__}. bladeflow optimizes models that "
            "ONNX Runtime runs as they are: re-export the model with standard ONNX operators, "
            "or replace that node."
        )


@functools.lru_cache(maxsize=1)
def _ort_operators() -> frozenset[tuple[str, str]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    return frozenset((s.domain or "", s.name) for s in ort_c.get_all_operator_schema())


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
