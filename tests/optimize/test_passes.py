from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from bladeflow.core.contract import Tolerance
from bladeflow.tasks.optimize.base import PassNotApplicable, all_passes, get_pass
from bladeflow.tasks.optimize.recipes import BASELINE_SESSION, build_candidate, parse_passes
from bladeflow.tasks.optimize.session import physical_cores
from bladeflow.tasks.optimize.transformer_fusion import detect_transformer
from bladeflow.tasks.validate.accuracy import compare, predict
from tests import models
from tests.optimize import tiny
from tests.optimize.conftest import Prepared, prepare

STRICT = Tolerance()  # atol 1e-4, rtol 1e-3, min cosine 0.999
LOOSE = Tolerance(atol=0.5, rtol=0.5, min_cosine=0.99)
COSINE = Tolerance(atol=1e3, rtol=0.0, min_cosine=0.99)  # judged by cosine alone


def _gate(prepared: Prepared, spec: str, workdir: Path, tol: Tolerance, context=None):
    cand = build_candidate(parse_passes(spec)[0], prepared.model, workdir, context)
    outputs = predict(cand.artifact, cand.session, prepared.data)
    return cand, compare(cand.name, outputs, prepared.reference, tol, True)


def _details(cand) -> dict:
    return json.loads((Path(cand.artifact.path).parent / "pass_config.json").read_text())["details"]


def test_every_registered_pass_imports_with_a_unique_key_and_a_docstring():
    # setup / execute
    passes = all_passes()
    # assert
    expected = {"simplify", "ort_graph", "transformer_fusion", "fp16", "int8_dynamic"}
    expected |= {"int8_static", "mixed_precision", "session", "cuda", "tensorrt"}
    assert expected <= set(passes)
    assert len({cls for cls in passes.values()}) == len(passes)
    for key, cls in passes.items():
        assert cls.name == key
        doc = (cls.__doc__ or "").strip()
        assert doc and "\n" not in doc, f"{key} needs a one-line class docstring"
        cls()  # the default config is valid
        why = cls.applicable({"cpu": "x", "arch": "x86_64", "isa": [], "threads": 2, "gpus": []})
        assert why is None or isinstance(why, str)


@pytest.mark.torch
def test_simplify_keeps_outputs_of_a_bert(tiny_bert: Prepared, tmp_path: Path):
    # execute
    cand, report = _gate(tiny_bert, "simplify", tmp_path, STRICT)
    # assert
    before = len(onnx.load(tiny_bert.model.path).graph.node)
    assert len(onnx.load(cand.artifact.path).graph.node) < before
    assert report.passed, report.reason


@pytest.mark.torch
def test_transformer_fusion_detects_and_fuses_attention(tiny_bert: Prepared, tmp_path: Path):
    # setup
    found = detect_transformer(onnx.load(tiny_bert.model.path))
    # execute
    cand, report = _gate(tiny_bert, "transformer_fusion", tmp_path, STRICT)
    # assert
    assert found == {"model_type": "bert", "hidden_size": 32, "num_heads": 2, "head_size": 16}
    fused = _details(cand)["fused"]
    assert fused.get("Attention") == 2, fused  # one per layer
    assert fused.get("SkipLayerNormalization") == 4, fused
    assert fused.get("EmbedLayerNormalization") == 1, fused
    ops = tiny.op_counts(cand.artifact.path)
    assert "Softmax" not in ops and ops["Attention"] == 2
    assert report.passed, report.reason


@pytest.mark.torch
def test_dynamic_int8_quantizes_a_fused_bert(tiny_bert: Prepared, tmp_path: Path):
    # execute
    cand, strict = _gate(tiny_bert, "transformer_fusion+int8_dynamic", tmp_path, STRICT)
    loose = compare(
        cand.name,
        predict(cand.artifact, cand.session, tiny_bert.data),
        tiny_bert.reference,
        LOOSE,
        True,
    )
    # assert
    ops = tiny.op_counts(cand.artifact.path)
    assert ops.get("DynamicQuantizeLinear", 0) > 0 and ops.get("MatMulInteger", 0) > 0, ops
    assert ops.get("QAttention") == 2, ops
    assert not strict.passed  # int8 is not within 1e-4 of fp32
    assert loose.passed, loose.reason
    config = cand.recipe[-1].config
    assert config["weight_type"] in {"QInt8", "QUInt8"} and isinstance(config["reduce_range"], bool)


@pytest.mark.parametrize("method", ["MinMax", "Entropy", "Percentile"])
def test_static_int8_calibrates_on_the_validation_data(tmp_path: Path, method: str):
    # setup
    prepared = prepare(models.mlp(tmp_path / "mlp.onnx", features=16, hidden=32), tmp_path, 64)
    context = prepared.context(COSINE)
    # execute
    spec = f"int8_static:method={method}"
    cand, report = _gate(prepared, spec, tmp_path / "c", COSINE, context)
    # assert
    ops = tiny.op_counts(cand.artifact.path)
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0, ops
    assert report.passed, report.reason
    with pytest.raises(PassNotApplicable, match="PassContext"):
        build_candidate(parse_passes("int8_static")[0], prepared.model, tmp_path / "no-context")


def test_fp16_keeps_float32_io_and_is_close_but_not_exact(tmp_path: Path):
    # setup
    prepared = prepare(models.mlp(tmp_path / "mlp.onnx"), tmp_path)
    # execute
    cand, report = _gate(prepared, "fp16", tmp_path / "c", Tolerance(atol=1e-2, rtol=1e-2))
    exact = compare(
        cand.name,
        predict(cand.artifact, cand.session, prepared.data),
        prepared.reference,
        Tolerance(atol=1e-9, rtol=0.0),
        True,
    )
    # assert
    model = onnx.load(cand.artifact.path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert report.passed, report.reason
    assert not exact.passed


def test_session_tuning_changes_only_the_session(tmp_path: Path):
    # setup
    prepared = prepare(models.mlp(tmp_path / "mlp.onnx"), tmp_path)
    # execute
    cand, report = _gate(prepared, "session:threads=cores;spinning=false", tmp_path / "c", STRICT)
    # assert
    assert cand.artifact.path == prepared.model.path  # no new model file
    assert cand.session.intra_op_num_threads == physical_cores() >= 1
    assert cand.session.allow_spinning is False
    assert report.passed, report.reason


def test_chains_sharing_a_prefix_build_it_once(tmp_path: Path):
    # setup
    prepared = prepare(models.mlp(tmp_path / "mlp.onnx"), tmp_path)
    a, b = parse_passes("ort_graph:level=all,ort_graph:level=all+session:spinning=false")
    # execute
    ca = build_candidate(a, prepared.model, tmp_path / "c")  # the 3-argument call still works
    cb = build_candidate(b, prepared.model, tmp_path / "c")
    # assert
    assert ca.artifact.sha256 == cb.artifact.sha256
    assert Path(ca.artifact.path) == tmp_path / "c" / a.name / "00-ort_graph" / "model.onnx"
    assert Path(cb.artifact.path).samefile(tmp_path / "c" / b.name / "00-ort_graph" / "model.onnx")
    # built once: both are links to one file
    assert Path(ca.artifact.path).stat().st_ino == Path(cb.artifact.path).stat().st_ino
    assert ca.session.allow_spinning and not cb.session.allow_spinning
    assert [r.name for r in cb.recipe] == ["ort_graph", "session"]
    assert b.name == "ort_graph-levelall_session-spinningfalse"  # a valid MLflow metric key


def test_int8_dynamic_settings_follow_the_cpu_isa():
    # setup
    avx2 = {"arch": "x86_64", "isa": ["avx2", "fma"], "gpus": []}
    vnni = {"arch": "x86_64", "isa": ["avx2", "avx512f", "avx512_vnni"], "gpus": []}
    from bladeflow.tasks.optimize.int8_dynamic import QuantizeDynamicConfig, resolve

    # execute
    on_avx2 = resolve(QuantizeDynamicConfig(), avx2)
    on_vnni = resolve(QuantizeDynamicConfig(), vnni)
    forced = resolve(QuantizeDynamicConfig(reduce_range=False, weight_type="QUInt8"), avx2)
    # assert
    assert (on_avx2.weight_type, on_avx2.reduce_range) == ("QInt8", True)
    assert (on_vnni.weight_type, on_vnni.reduce_range) == ("QInt8", False)
    assert (forced.weight_type, forced.reduce_range) == ("QUInt8", False)


def test_unknown_pass_option_is_refused():
    with pytest.raises(Exception, match="invalid config"):
        get_pass("int8_dynamic", {"per_chanel": True})


def test_baseline_session_is_the_reference_session():
    assert BASELINE_SESSION.graph_optimization_level == "disable"
    assert np.isfinite(physical_cores())
