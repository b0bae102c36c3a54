from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from bladeflow.core.contract import SessionConfig, Tolerance
from bladeflow.core.environment import hardware
from bladeflow.tasks.optimize.base import PassNotApplicable
from bladeflow.tasks.optimize.int8_static import graph_op_types
from bladeflow.tasks.optimize.recipes import (
    BASELINE,
    PRESETS,
    build_candidate,
    parse_passes,
    plan_recipes,
    resolve_recipes,
)
from bladeflow.tasks.optimize.tensorrt import (
    TensorrtConfig,
    profile_shapes,
    tensorrt_provider_options,
)
from bladeflow.tasks.validate.accuracy import compare, predict
from tests.optimize.conftest import Prepared

NO_GPU = {"cpu": "test", "arch": "x86_64", "isa": ["avx2", "fma"], "threads": 2, "gpus": []}
VNNI = {**NO_GPU, "isa": ["avx2", "avx512f", "avx512_vnni"]}
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers() and bool(hardware()["gpus"])


def test_every_preset_starts_with_the_baseline_and_names_recipes_uniquely():
    for preset in PRESETS:
        # execute
        plan = plan_recipes(preset, hw=NO_GPU)
        # assert
        names = [r.name for r in plan.recipes] + list(plan.skipped)
        assert names[0] == BASELINE
        assert len(names) == len(set(names)), names


def test_gpu_presets_skip_every_gpu_recipe_with_a_reason_without_a_gpu():
    # execute
    plans = {p: plan_recipes(p, hw=NO_GPU) for p in ("cuda", "tensorrt")}
    with_gpu_cpu_build = plan_recipes("tensorrt", hw={**NO_GPU, "gpus": ["H100, 80 GiB"]})
    # assert
    for plan in plans.values():
        assert [r.name for r in plan.recipes] == [BASELINE]
        assert plan.skipped and all("no NVIDIA GPU" in why for why in plan.skipped.values())
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        assert "onnxruntime-gpu" in with_gpu_cpu_build.skipped["tensorrt-fp16"]


def test_cpu_preset_is_isa_aware():
    # execute
    avx2 = {r.name for r in plan_recipes("cpu", hw=NO_GPU).recipes}
    vnni = {r.name for r in plan_recipes("cpu", hw=VNNI).recipes}
    # assert
    assert "fused-int8-u8u8-tuned" in avx2 and "fused-int8-u8u8-tuned" not in vnni
    assert {"fused", "fused-int8", "fused-int8-recovered", "fused-tuned"} <= avx2 & vnni


def test_inapplicable_pass_is_refused_at_build_time(tiny_model_path: Path, tmp_path: Path):
    # setup
    from bladeflow.tasks.convert.onnx_source import load_onnx_source

    model = load_onnx_source(tiny_model_path, tmp_path / "conv")
    recipe = parse_passes("cuda")[0]
    # execute / assert
    if HAS_CUDA:
        pytest.skip("this machine has CUDA")
    with pytest.raises(PassNotApplicable, match="not applicable here"):
        build_candidate(recipe, model, tmp_path)


@pytest.mark.torch
def test_intolerant_gate_leaves_only_the_exact_baseline(tiny_bert: Prepared, tmp_path: Path):
    # setup
    exact = Tolerance(atol=1e-9, rtol=0.0)
    context = tiny_bert.context(exact, budget=30.0)
    recipes = resolve_recipes("cpu", op_types=graph_op_types(tiny_bert.model.path))
    # execute
    passing = []
    for recipe in recipes:
        cand = build_candidate(recipe, tiny_bert.model, tmp_path, context)
        got = predict(cand.artifact, cand.session, tiny_bert.data)
        if compare(cand.name, got, tiny_bert.reference, exact, True).passed:
            passing.append(cand.name)
    # assert
    assert len(recipes) > 5
    assert passing == [BASELINE]


def test_tensorrt_profiles_cover_the_dynamic_dims(tiny_model_path: Path, tmp_path: Path):
    # setup
    model = onnx.load(str(tiny_model_path))
    # execute
    mins, opts, maxs = profile_shapes(model, TensorrtConfig().profile)
    options = tensorrt_provider_options(tiny_model_path, TensorrtConfig(), tmp_path / "cache")
    # assert
    assert (mins, opts, maxs) == ("x:1x8", "x:8x8", "x:32x8")
    assert options["trt_engine_cache_enable"] == "true"
    assert options["trt_profile_max_shapes"] == "x:32x8"


@pytest.fixture
def tiny_model_path(tmp_path: Path) -> Path:
    from tests import models

    return models.mlp(tmp_path / "mlp.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU and onnxruntime-gpu")
def test_cuda_fp16_candidate_runs_on_the_gpu(tmp_path: Path):
    # setup
    from tests import models
    from tests.optimize.conftest import prepare

    prepared = prepare(models.mlp(tmp_path / "mlp.onnx"), tmp_path)
    recipe = parse_passes("fp16+cuda")[0]
    # execute
    cand = build_candidate(recipe, prepared.model, tmp_path / "c")
    got = predict(cand.artifact, cand.session, prepared.data)
    report = compare(cand.name, got, prepared.reference, Tolerance(atol=1e-2, rtol=1e-2), True)
    # assert
    assert cand.session.providers[0] == "CUDAExecutionProvider"
    assert report.passed, report.reason


@pytest.mark.gpu
@pytest.mark.skipif(
    "TensorrtExecutionProvider" not in ort.get_available_providers() or not HAS_CUDA,
    reason="needs an NVIDIA GPU, onnxruntime-gpu and TensorRT",
)
def test_tensorrt_candidate_builds_an_engine_cache(tmp_path: Path):
    # setup
    from tests import models
    from tests.optimize.conftest import prepare

    prepared = prepare(models.mlp(tmp_path / "mlp.onnx"), tmp_path)
    recipe = parse_passes("tensorrt:fp16=false")[0]
    # execute
    cand = build_candidate(recipe, prepared.model, tmp_path / "c")
    options = Path(cand.artifact.path).parent / "provider_options.json"
    sess = ort.InferenceSession(
        cand.artifact.path,
        providers=[
            (
                "TensorrtExecutionProvider",
                __import__("json").loads(options.read_text())["TensorrtExecutionProvider"],
            ),
            "CPUExecutionProvider",
        ],
    )
    out = sess.run(None, {"x": prepared.data["x"][:4]})[0]
    # assert
    assert out.shape == (4, 4)
    assert any((Path(cand.artifact.path).parent / "trt_cache").iterdir())


def test_cnn_recipes_are_skipped_on_a_graph_without_conv_and_planned_with_one():
    # execute
    no_conv = plan_recipes("cpu", hw=NO_GPU, op_types={"MatMul", "Add"})
    conv = plan_recipes("cpu", hw=NO_GPU, op_types={"Conv", "Relu"})
    # assert
    cnn = {"cnn-int8", "cnn-int8-tuned", "cnn-int8-recovered", "cnn-int8-recovered-tuned"}
    assert cnn <= set(no_conv.skipped)
    assert all("no Conv node" in no_conv.skipped[n] for n in cnn)
    assert cnn <= {r.name for r in conv.recipes}


def test_passes_option_takes_lists():
    # execute
    (recipe,) = parse_passes("int8_static:op_types=Conv|Gemm;requires_ops=Conv|")
    # assert
    assert recipe.passes[0].config == {"op_types": ["Conv", "Gemm"], "requires_ops": ["Conv"]}


def test_tensorrt_options_travel_in_the_session_config_and_resolve_next_to_the_model(
    tiny_model_path: Path, tmp_path: Path
):
    # setup: the pass itself (build_candidate would refuse it without a GPU)
    from bladeflow.core.runtime import provider_list
    from bladeflow.tasks.convert.onnx_source import load_onnx_source
    from bladeflow.tasks.optimize.tensorrt import TensorrtExecution

    model = load_onnx_source(tiny_model_path, tmp_path / "converted")
    step = TensorrtExecution({"fp16": True})
    # execute
    out = step.run(model, tmp_path / "trt")
    session = step.session_config(SessionConfig())
    cpu_opts = SessionConfig(provider_options={"CPUExecutionProvider": {"x_path": "cache"}})
    # assert: options recorded in the session config (so serving builds the same engine)
    trt = session.provider_options["TensorrtExecutionProvider"]
    assert trt["trt_engine_cache_path"] == "trt_cache" and trt["trt_fp16_enable"] == "true"
    assert trt["trt_profile_opt_shapes"] == "x:8x8"
    assert session.providers[0] == "TensorrtExecutionProvider"
    # assert: relative *_path options resolve against the model's folder; absent providers drop
    assert provider_list(cpu_opts, out.path) == [
        ("CPUExecutionProvider", {"x_path": str(Path(out.path).resolve().parent / "cache")})
    ]
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        assert provider_list(session, out.path) == ["CPUExecutionProvider"]
