from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bladeflow.core.contract import Tolerance
from bladeflow.tasks.optimize.base import PassNotApplicable
from bladeflow.tasks.optimize.recipes import build_candidate, parse_passes, plan_recipes
from bladeflow.tasks.optimize.sensitivity import (
    cosine_measure,
    dynamic_int8,
    error_ranking,
    run_model,
)
from bladeflow.tasks.optimize.smoothquant import find_groups
from bladeflow.tasks.validate.accuracy import compare, predict
from tests.models import _save
from tests.optimize import tiny
from tests.optimize.conftest import Prepared, prepare

FEATURES = 16


def ln_graph(path: Path, residual: bool = False, seed: int = 0) -> Path:
    """x -> LayerNorm (gamma[0] = 40: an outlier channel) -> MatMul wq, MatMul wk -> q + k (-> y).

    With ``residual`` the LayerNorm output also feeds an Add (as in post-LN BERT), so 1/s cannot
    be folded into gamma; a second LayerNorm -> MatMul ``mm_out`` pair is foldable either way.
    """
    rng = np.random.default_rng(seed)
    w = {n: rng.standard_normal((FEATURES, FEATURES)).astype(np.float32) / 4 for n in "qko"}
    gamma = np.ones(FEATURES, dtype=np.float32)
    gamma[0] = 40.0
    beta = rng.standard_normal(FEATURES).astype(np.float32) / 10
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln1"),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["ln", "wk"], ["k"], name="mm_k"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="add"),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["qk", "ln"], ["h"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", ["qk"], ["h"], name="same"))
    nodes += [
        helper.make_node("LayerNormalization", ["h", "gamma2", "beta"], ["ln2"], name="ln2"),
        helper.make_node("MatMul", ["ln2", "wo"], ["y"], name="mm_out"),
    ]
    gamma2 = np.ones(FEATURES, dtype=np.float32)
    gamma2[3] = 25.0
    graph = helper.make_graph(
        nodes,
        "ln_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, FEATURES])],
        initializer=[
            numpy_helper.from_array(w["q"], "wq"),
            numpy_helper.from_array(w["k"], "wk"),
            numpy_helper.from_array(w["o"], "wo"),
            numpy_helper.from_array(gamma, "gamma"),
            numpy_helper.from_array(gamma2, "gamma2"),
            numpy_helper.from_array(beta, "beta"),
        ],
    )
    return _save(graph, path, opset=17)


def _details(cand) -> dict:
    folder = Path(cand.artifact.path).parent
    return json.loads((folder / "pass_config.json").read_text())["details"]


def _int8_min_cosine(path: Path, prepared: Prepared, work: Path) -> float:
    quantized = work / f"{path.stem}-int8.onnx"
    dynamic_int8()(path, quantized, [], None)
    return float(cosine_measure(run_model(quantized, prepared.data), prepared.reference).min())


def test_smoothquant_is_fp32_equivalent_and_folds_into_layernorm(tmp_path: Path):
    # setup
    prepared = prepare(ln_graph(tmp_path / "ln.onnx"), tmp_path, samples=32)
    context = prepared.context(Tolerance(atol=1.0, rtol=0.0, min_cosine=0.99))
    # execute
    cand = build_candidate(parse_passes("smoothquant")[0], prepared.model, tmp_path / "c", context)
    # assert: same function in fp32 (fp32 noise only), 1/s went into both gammas, no Mul added
    got = predict(cand.artifact, cand.session, prepared.data)
    ref = prepared.reference["y"]
    np.testing.assert_allclose(got["y"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    details = _details(cand)
    assert details["folds"] == {"norm": 2, "attention_v": 0, "mul": 0}
    ops = tiny.op_counts(cand.artifact.path)
    assert "Mul" not in ops and ops["MatMul"] == 3
    smoothed = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(cand.artifact.path).graph.initializer
    }
    gammas = [v for k, v in smoothed.items() if k.startswith("gamma") and "smoothquant" in k]
    assert len(gammas) == 2 and all(not np.allclose(g, 1.0) for g in gammas)


def test_alpha_search_picks_a_configured_alpha_that_improves_int8(tmp_path: Path):
    # setup
    prepared = prepare(ln_graph(tmp_path / "ln.onnx"), tmp_path, samples=32)
    context = prepared.context(Tolerance(atol=1.0, rtol=0.0, min_cosine=0.99))
    alphas = [0.25, 0.5, 0.75]
    recipe = parse_passes("smoothquant:alphas=0.25|0.5|0.75")[0]
    # execute
    cand = build_candidate(recipe, prepared.model, tmp_path / "c", context)
    # assert: a configured alpha, scored for each, and the int8 model is better than unsmoothed
    details = _details(cand)
    assert details["alpha"] in alphas
    assert set(details["int8_min_cosine_by_alpha"]) == {"none", "0.25", "0.5", "0.75"}
    scores = details["int8_min_cosine_by_alpha"]
    assert scores[str(details["alpha"])] == max(scores.values()) > scores["none"]
    before = _int8_min_cosine(Path(prepared.model.path), prepared, tmp_path)
    after = _int8_min_cosine(Path(cand.artifact.path), prepared, tmp_path)
    assert after > before


def test_layernorm_feeding_a_non_matmul_is_not_folded(tmp_path: Path):
    # setup: ln1's output also feeds the residual Add
    path = ln_graph(tmp_path / "res.onnx", residual=True)
    prepared = prepare(path, tmp_path, samples=32)
    context = prepared.context(Tolerance(atol=1.0, rtol=0.0, min_cosine=0.99))
    # execute
    no_mul = find_groups(onnx.load(str(path)), insert_mul=False)
    with_mul = find_groups(onnx.load(str(path)), insert_mul=True)
    cand = build_candidate(
        parse_passes("smoothquant:insert_mul=false")[0], prepared.model, tmp_path / "a", context
    )
    cand_mul = build_candidate(
        parse_passes("smoothquant")[0], prepared.model, tmp_path / "b", context
    )
    # assert: without a Mul only ln2 -> mm_out is equalized; ln1's gamma is untouched
    assert [(g.tensor, g.fold) for g in no_mul] == [("ln2", "norm")]
    assert sorted((g.tensor, g.fold) for g in with_mul) == [("ln", "mul"), ("ln2", "norm")]
    graph = onnx.load(cand.artifact.path).graph
    ln1 = next(n for n in graph.node if n.name == "ln1")
    assert ln1.input[1] == "gamma"
    assert "Mul" not in tiny.op_counts(cand.artifact.path)
    # with the Mul: the residual still reads the unscaled LayerNorm output, same function
    assert tiny.op_counts(cand_mul.artifact.path)["Mul"] == 1
    for c in (cand, cand_mul):
        got = predict(c.artifact, c.session, prepared.data)["y"]
        ref = prepared.reference["y"]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_smoothquant_needs_something_to_equalize(tmp_path: Path):
    # setup: Conv only
    prepared = prepare(tiny.sensitive_cnn(tmp_path / "cnn.onnx"), tmp_path)
    context = prepared.context(Tolerance())
    # execute / assert
    with pytest.raises(PassNotApplicable, match="equalize"):
        build_candidate(parse_passes("smoothquant")[0], prepared.model, tmp_path / "c", context)


@pytest.mark.torch
def test_smooth_int8_recipes_build_and_pass_on_a_tiny_bert(tiny_bert: Prepared, tmp_path: Path):
    # setup
    gate = Tolerance(atol=1.0, rtol=0.0, min_cosine=0.99)
    context = tiny_bert.context(gate, budget=60.0)
    recipes = {r.name: r for r in plan_recipes("cpu").recipes}
    # execute
    built = {
        name: build_candidate(recipes[name], tiny_bert.model, tmp_path, context)
        for name in ("fused-smooth-int8", "fused-smooth-int8-recovered")
    }
    # assert: the smoothing step is fp32-equivalent (Attention's V folded), and both pass
    smooth_step = Path(built["fused-smooth-int8"].artifact.path).parent.parent / "01-smoothquant"
    details = json.loads((smooth_step / "pass_config.json").read_text())["details"]
    assert details["folds"]["attention_v"] == 2
    assert details["fp32_equivalence"]["min_cosine"] > 1 - 1e-6
    for name, cand in built.items():
        got = predict(cand.artifact, cand.session, tiny_bert.data)
        report = compare(name, got, tiny_bert.reference, gate, True)
        assert report.passed, f"{name}: {report.reason}"
    assert tiny.op_counts(built["fused-smooth-int8"].artifact.path).get("MatMulInteger", 0) > 0


@pytest.mark.parametrize("mode", ["only", "all_but"])
def test_error_ranking_puts_the_outlier_matmul_first(tmp_path: Path, mode: str):
    # setup: mm_b's input has one feature 1000x larger than the rest
    path = tiny.sensitive_chain(tmp_path / "s.onnx")
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((32, 16)).astype(np.float32)}
    # execute
    ranking = error_ranking(
        onnx.load(str(path)), ["mm_a", "mm_b", "mm_c"], data, tmp_path, mode=mode
    )
    # assert: same shape as activation_ranking, and mm_b clearly first
    assert [n for _, n in ranking] == ["mm_a", "mm_b", "mm_c"]
    scores = dict((n, s) for s, n in ranking)
    assert max(ranking)[1] == "mm_b"
    assert scores["mm_b"] > 10 * max(scores["mm_a"], scores["mm_c"], 1e-6)


def test_error_ranking_takes_the_measure_as_a_callable(tmp_path: Path):
    # setup: a measure that only looks at output feature 5 (another engineer's budget, say)
    path = tiny.sensitive_chain(tmp_path / "s.onnx")
    data = {"x": np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32)}
    seen = []

    def feature_five(outputs, reference):
        seen.append(True)
        return 1.0 - np.abs(outputs["y"][:, 5] - reference["y"][:, 5])

    # execute
    ranking = error_ranking(
        onnx.load(str(path)), ["mm_b", "mm_c"], data, tmp_path, measure=feature_five
    )
    # assert
    assert len(seen) == 2 and max(ranking)[1] == "mm_b"
