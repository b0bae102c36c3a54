from __future__ import annotations

import json
from pathlib import Path

import pytest

from bladeflow.core.contract import Tolerance
from bladeflow.tasks.optimize.base import PassNotApplicable
from bladeflow.tasks.optimize.recipes import build_candidate, parse_passes, plan_recipes
from bladeflow.tasks.validate.accuracy import compare, predict
from tests.optimize import tiny
from tests.optimize.conftest import prepare

GATE = Tolerance(atol=0.2, rtol=0.05, min_cosine=0.99)


def _check(prepared, cand, tol):
    got = predict(cand.artifact, cand.session, prepared.data)
    return compare(cand.name, got, prepared.reference, tol, True)


@pytest.mark.parametrize("sensitivity", ["activation_range", "measured"])
def test_recovery_keeps_only_the_sensitive_matmul_in_fp32(tmp_path: Path, sensitivity: str):
    # setup: mm_b's input has one feature 1000x larger, so one int8 scale wipes out the rest
    prepared = prepare(tiny.sensitive_chain(tmp_path / "s.onnx"), tmp_path, samples=32)
    context = prepared.context(GATE)
    plain = build_candidate(parse_passes("int8_dynamic")[0], prepared.model, tmp_path / "c")
    # execute
    recovered = build_candidate(
        parse_passes(f"mixed_precision:sensitivity={sensitivity}")[0],
        prepared.model,
        tmp_path / "c",
        context,
    )
    # assert
    assert not _check(prepared, plain, GATE).passed
    report = _check(prepared, recovered, GATE)
    assert report.passed, report.reason
    details = json.loads((Path(recovered.artifact.path).parent / "pass_config.json").read_text())
    assert details["details"]["fp32_nodes"] == ["mm_b"]
    assert details["details"]["sensitivity_top"][0] == "mm_b"
    ops = tiny.op_counts(recovered.artifact.path)
    assert ops["MatMulInteger"] == 2 and ops["MatMul"] == 1  # mm_a and mm_c stay int8


def test_recovery_with_no_time_left_returns_the_full_attempt(tmp_path: Path):
    # setup
    prepared = prepare(tiny.sensitive_chain(tmp_path / "s.onnx"), tmp_path, samples=32)
    context = prepared.context(GATE, budget=0.0)
    # execute
    cand = build_candidate(parse_passes("mixed_precision")[0], prepared.model, tmp_path, context)
    # assert
    details = json.loads((Path(cand.artifact.path).parent / "pass_config.json").read_text())
    assert details["details"]["budget_exhausted"] is True
    assert details["details"]["fp32_nodes"] == []
    assert not _check(prepared, cand, GATE).passed


def test_static_recovery_and_fp16_recovery_pass_the_gate(tmp_path: Path):
    # setup
    prepared = prepare(tiny.sensitive_chain(tmp_path / "s.onnx"), tmp_path, samples=32)
    context = prepared.context(GATE)
    specs = "mixed_precision:precision=int8_static,mixed_precision:precision=fp16"
    # execute
    built = [
        build_candidate(r, prepared.model, tmp_path / "c", context) for r in parse_passes(specs)
    ]
    # assert
    for cand in built:
        report = _check(prepared, cand, GATE)
        assert report.passed, f"{cand.name}: {report.reason}"
    assert tiny.op_counts(built[0].artifact.path).get("QuantizeLinear", 0) > 0


def test_recovery_needs_a_context(tmp_path: Path):
    # setup
    prepared = prepare(tiny.sensitive_chain(tmp_path / "s.onnx"), tmp_path)
    # execute / assert
    with pytest.raises(PassNotApplicable, match="validation data"):
        build_candidate(parse_passes("mixed_precision")[0], prepared.model, tmp_path / "c")


def test_cnn_static_int8_recovery_keeps_only_the_sensitive_conv_in_fp32(tmp_path: Path):
    # setup: conv_b's input has one channel 1000x larger than the rest
    prepared = prepare(tiny.sensitive_cnn(tmp_path / "cnn.onnx"), tmp_path, samples=32)
    context = prepared.context(GATE)
    quant = "op_types=Conv|MatMul|Gemm;requires_ops=Conv|"
    plain = build_candidate(
        parse_passes(f"int8_static:{quant}")[0], prepared.model, tmp_path / "c", context
    )
    # execute: the preset's CNN recovery recipe (op types to keep in fp32 follow the quantizer)
    recipe = next(r for r in plan_recipes("cpu").recipes if r.name == "cnn-int8-recovered")
    recovered = build_candidate(recipe, prepared.model, tmp_path / "c", context)
    # assert
    assert not _check(prepared, plain, GATE).passed
    assert _check(prepared, recovered, GATE).passed
    details = json.loads((Path(recovered.artifact.path).parent / "pass_config.json").read_text())
    assert details["details"]["fp32_nodes"] == ["conv_b"]
    assert details["config"]["op_types"] == ["Conv", "MatMul", "Gemm"]
    assert tiny.op_counts(recovered.artifact.path).get("QuantizeLinear", 0) > 0
    assert recovered.session.graph_optimization_level == "all"  # QDQ fuses at load
