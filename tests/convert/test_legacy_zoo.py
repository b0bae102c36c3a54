"""ONNX files from older exporters convert, normalize and give working candidates, or are refused.

Every zoo model (see ``tests/convert/legacy_models.py``) goes through ``convert_source``, the CPU
preset's plan and ``build_candidate`` for every planned recipe; each candidate must run in ONNX
Runtime on the model's real inputs alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from bladeflow.core.contract import DataRef, ModelArtifact, PassRecord, Tolerance
from bladeflow.core.errors import ModelFileError, UserInputError
from bladeflow.core.runtime import make_session
from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source
from bladeflow.tasks.convert.normalize import INT8_BLOCKED, QUANTIZER_MIN_OPSET
from bladeflow.tasks.optimize.base import PassContext, PassNotApplicable
from bladeflow.tasks.optimize.int8_static import graph_op_types
from bladeflow.tasks.optimize.recipes import Recipe, build_candidate, plan_recipes
from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, predict
from bladeflow.tasks.validate.data import synthesize
from tests.convert import legacy_models as zoo

# Candidates are judged by the accuracy gate elsewhere; here they only have to build and run.
LOOSE = Tolerance(atol=1.0, rtol=1.0, min_cosine=0.0)
INT8_RECIPES = {"fused-int8", "cnn-int8", "fused-int8-recovered", "cnn-int8-recovered"}


@dataclass
class Case:
    build: Callable[[Path], Path]
    opset: int  # after normalization
    int8: bool  # int8 recipes planned (False: skipped because the opset could not be upgraded)


def _torch(opset: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        pytest.importorskip("torch")
        return zoo.torch_cnn(folder / f"torch_opset{opset}.onnx", opset)

    return build


def _external(folder: Path) -> Path:
    return zoo.with_external_data(_torch(11)(folder), folder / "external")


def _caffe2_external(folder: Path) -> Path:
    return zoo.with_external_data(zoo.caffe2_cnn(folder / "caffe2.onnx"), folder / "external")


CASES = {
    "torch-opset9": Case(_torch(9), QUANTIZER_MIN_OPSET, True),
    "torch-opset10": Case(_torch(10), QUANTIZER_MIN_OPSET, True),
    "torch-opset11": Case(_torch(11), QUANTIZER_MIN_OPSET, True),
    "torch-opset11-external-data": Case(_external, QUANTIZER_MIN_OPSET, True),
    "caffe2-bn-spatial": Case(lambda d: zoo.caffe2_cnn(d / "c2.onnx"), QUANTIZER_MIN_OPSET, True),
    "caffe2-external-data": Case(_caffe2_external, QUANTIZER_MIN_OPSET, True),
    "caffe2-shape-arithmetic": Case(
        lambda d: zoo.caffe2_dynamic_shape(d / "c2dyn.onnx"), QUANTIZER_MIN_OPSET, True
    ),
    # No converter adapter: BatchNormalization spatial=0 (opset 7) and ImageScaler (opset <= 9).
    "caffe2-bn-spatial0": Case(lambda d: zoo.caffe2_cnn(d / "c2s0.onnx", spatial=0), 7, False),
    "caffe2-imagescaler-flatten": Case(
        lambda d: zoo.caffe2_flatten_head(d / "c2flat.onnx"), 9, False
    ),
    # The converter has an adapter, but its Resize computes other values: the upgrade is refused.
    "caffe2-upsample-linear": Case(lambda d: zoo.caffe2_upsample(d / "c2up.onnx"), 7, False),
}


def _context(model: ModelArtifact, folder: Path) -> tuple[PassContext, dict[str, np.ndarray]]:
    data = synthesize(model.signature, samples=8)
    np.savez(folder / "data.npz", **data)
    np.savez(folder / "reference.npz", **predict(model, REFERENCE_SESSION, data))
    context = PassContext(
        data=DataRef(path=str(folder / "data.npz"), samples=8, synthetic=True),
        reference_path=str(folder / "reference.npz"),
        tolerance=LOOSE,
        time_budget_s=20.0,
    )
    return context, data


def _convert_and_build(source: Path, folder: Path) -> tuple[ModelArtifact, dict[str, str], int]:
    """Convert ``source``, build every recipe of the CPU plan, run each candidate.

    Returns the converted model, the plan's skipped recipes and how many candidates ran.
    """
    model = convert_source(str(source), folder / "converted", ConvertOptions())
    context, data = _context(model, folder)
    plan = plan_recipes("cpu", op_types=graph_op_types(model.path), model=model)
    real = {s.name for s in model.signature.inputs}
    for recipe in plan.recipes:
        cand = build_candidate(recipe, model, folder / "candidates", context)
        session = make_session(cand.artifact.path, cand.session)
        needed = {i.name for i in session.get_inputs()}
        assert needed <= real, f"{recipe.name} needs inputs {needed - real} besides {real}"
        outputs = session.run(None, {k: v[:2] for k, v in data.items()})
        assert all(np.isfinite(o).all() for o in outputs), recipe.name
    return model, plan.skipped, len(plan.recipes)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_legacy_model_converts_and_every_candidate_runs(tmp_path: Path, case: str):
    # setup
    spec = CASES[case]
    source = spec.build(tmp_path)
    original = onnx.load(str(source), load_external_data=False)
    assert {i.name for i in original.graph.initializer} & {i.name for i in original.graph.input}
    # execute
    model, skipped, built = _convert_and_build(source, tmp_path / "work")
    # assert: weights left the inputs, the opset is one the quantizers take where possible
    converted = onnx.load(model.path, load_external_data=False)
    weights = {i.name for i in converted.graph.initializer}
    assert not weights & {i.name for i in converted.graph.input}
    assert converted.graph.input[0].name == model.signature.inputs[0].name
    assert model.provenance.step is not None
    config = model.provenance.step.config
    assert config["opset"] == spec.opset
    assert config["normalize"]["initializer_inputs_removed"] == len(weights & _inputs(original))
    # ... verified against the original file in ONNX Runtime, like any pass
    saved = json.loads((tmp_path / "work" / "converted" / "convert_config.json").read_text())
    assert saved["verification"]["runner"] == "onnxruntime"
    assert max(o["max_abs_error"] for o in saved["verification"]["outputs"].values()) < 1e-4
    # ... and the int8 recipes are planned, or skipped with the reason
    int8_skipped = {n for n in skipped if n.removesuffix("-tuned") in INT8_RECIPES}
    if spec.int8:
        assert INT8_BLOCKED not in config
        assert "fused-int8" not in skipped
        assert not any("below 13" in why for why in skipped.values())
    else:
        assert "could not be upgraded" in config[INT8_BLOCKED]
        assert int8_skipped and all("below 13" in skipped[n] for n in int8_skipped)
    assert built >= 5  # baseline, ort-extended, ort-all, fused, fused-tuned at least


def _inputs(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.input}


@pytest.mark.tf
def test_tf2onnx_keras_cnn_converts_and_every_candidate_runs(tmp_path: Path):
    # setup: tf2onnx at opset 10 (NHWC input, Transpose around the convolutions)
    pytest.importorskip("tf2onnx")
    source = zoo.keras_cnn_tf2onnx(tmp_path / "keras.onnx", opset=10)
    # execute
    model, skipped, built = _convert_and_build(source, tmp_path / "work")
    # assert
    assert model.provenance.step is not None
    assert model.provenance.step.config["opset"] == QUANTIZER_MIN_OPSET
    assert [s.shape[1:] for s in model.signature.inputs] == [[8, 8, 3]]
    assert "cnn-int8" not in skipped and built >= 9


def test_custom_domain_operator_is_refused_naming_op_node_and_domain(tmp_path: Path):
    # setup
    source = zoo.custom_domain(tmp_path / "vendor.onnx")
    # execute
    with pytest.raises(ModelFileError) as caught:
        convert_source(str(source), tmp_path / "work", ConvertOptions())
    # assert: exit 2, with what to look for in the model
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert "'DCNv2'" in message and "'backbone/dcn_1'" in message and "'org.vendor'" in message
    assert not (tmp_path / "work" / "model.onnx").exists()


def test_keep_initializer_inputs_keeps_the_weights_overridable(tmp_path: Path):
    # setup
    source = zoo.caffe2_cnn(tmp_path / "c2.onnx")
    weights = {i.name for i in onnx.load(str(source)).graph.initializer}
    # execute
    model = convert_source(
        str(source), tmp_path / "work", ConvertOptions(keep_initializer_inputs=True)
    )
    # assert: still listed (and fed if given), the signature names only the real input
    graph = onnx.load(model.path).graph
    assert weights <= {i.name for i in graph.input}
    assert [s.name for s in model.signature.inputs] == ["gpu_0/data:0"]
    assert model.provenance.step is not None
    assert model.provenance.step.config["keep_initializer_inputs"] is True
    assert model.provenance.step.config["normalize"]["initializer_inputs_removed"] == 0
    assert model.provenance.step.config["opset"] == QUANTIZER_MIN_OPSET


def test_modern_model_is_left_alone_and_not_reverified(tmp_path: Path):
    # setup: opset 13+, weights not inputs: nothing to normalize
    source = zoo.caffe2_dynamic_shape(tmp_path / "old.onnx")
    modern = convert_source(str(source), tmp_path / "first", ConvertOptions())
    # execute
    again = convert_source(modern.path, tmp_path / "second", ConvertOptions())
    # assert
    saved = json.loads((tmp_path / "second" / "convert_config.json").read_text())
    assert saved["verification"]["runner"] is None
    assert again.provenance.step is not None
    assert again.provenance.step.config["normalize"]["opset"] == [13, 13]


def test_target_opset_below_13_is_honoured_and_blocks_int8(tmp_path: Path):
    # setup
    source = zoo.caffe2_dynamic_shape(tmp_path / "m.onnx")
    # execute
    model = convert_source(str(source), tmp_path / "w", ConvertOptions(target_opset=9))
    # assert
    assert model.provenance.step is not None
    config = model.provenance.step.config
    assert config["opset"] == 9 and config["normalize"]["initializer_inputs_removed"] == 4
    assert "target_opset=9 was asked for" in config[INT8_BLOCKED]


def test_int8_recipes_are_skipped_only_for_a_blocked_model(tmp_path: Path):
    # setup
    model = convert_source(
        str(zoo.caffe2_cnn(tmp_path / "c2s0.onnx", spatial=0)), tmp_path / "w", ConvertOptions()
    )
    assert model.provenance.step is not None
    hw = {"isa": ["avx2"], "gpus": []}
    # execute
    blocked = plan_recipes("cpu", hw=hw, op_types={"Conv"}, model=model)
    unknown = plan_recipes("cpu", hw=hw, op_types={"Conv"})
    chain = Recipe(name="q", passes=[PassRecord(name="ort_graph"), PassRecord(name="int8_dynamic")])
    # assert
    planned = {r.name for r in blocked.recipes}
    assert {"baseline", "ort-extended", "ort-all", "fused"} <= planned
    assert not planned & {f"{n}{s}" for n in INT8_RECIPES for s in ("", "-tuned")}
    assert blocked.skipped["cnn-int8"].startswith("int8_static: not applicable to this model")
    assert blocked.skipped["fused-int8-recovered"].startswith("mixed_precision:")
    assert {"cnn-int8", "fused-int8"} <= {r.name for r in unknown.recipes}
    with pytest.raises(PassNotApplicable, match="opset 7 is below 13") as caught:
        build_candidate(chain, model, tmp_path / "c")
    assert isinstance(caught.value, UserInputError)
