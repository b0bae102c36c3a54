"""Named presets per target: which recipes (pass chains + session) are tried on which hardware.

Every preset is a function of the machine (bladeflow.core.environment.hardware), so CPU presets pick
int8 settings for the CPU's ISA; recipes whose passes cannot run here are skipped with a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bladeflow.core.contract import PassRecord
from bladeflow.tasks.optimize.int8_dynamic import has_vnni
from bladeflow.tasks.optimize.recipe import Recipe

# onnxslim before the transformer optimizer was measured to stop Attention fusion (tiny BERT:
# 2 Attention -> 0), so the fused chains do not simplify first.
FUSED = PassRecord(name="transformer_fusion", config={})
# Spinning off and one thread per physical core: the measured wins on small shared VMs; the
# untuned variants stay in the search so the gate + benchmark decide, not this comment.
TUNED = PassRecord(name="session", config={"threads": "cores", "spinning": False})
# CNNs: static int8 (QDQ, calibrated on the user's data) on Conv/MatMul/Gemm after ORT's basic
# level folded BatchNorm into Conv. Measured on this 2-core AVX2 CPU, a 6-conv CNN at 96x96:
# fp32 1.54 ms -> int8 0.95 ms at batch 1, 15.3 -> 9.2 ms at batch 8, min cosine 0.9997.
# Graphs without Conv skip it (static QDQ on MiniLM's MatMuls dropped cosine to 0.3-0.5).
CNN_INT8 = {"op_types": ["Conv", "MatMul", "Gemm"], "requires_ops": ["Conv"]}
BASIC = PassRecord(name="ort_graph", config={"level": "basic"})
SMOOTH = PassRecord(name="smoothquant", config={})


def _tuned(recipe: Recipe) -> list[Recipe]:
    return [recipe, Recipe(name=f"{recipe.name}-tuned", passes=[*recipe.passes, TUNED])]


def cpu(hw: dict[str, Any]) -> list[Recipe]:
    recipes = [
        Recipe(
            name="ort-extended",
            passes=[PassRecord(name="ort_graph", config={"level": "extended"})],
        ),
        Recipe(name="ort-all", passes=[PassRecord(name="ort_graph", config={"level": "all"})]),
        *_tuned(Recipe(name="fused", passes=[FUSED])),
        # weight_type/reduce_range "auto": S8 weights; reduce_range on AVX2/AVX-512 without VNNI
        # (u8*s8 pairs saturate int16 in vpmaddubsw), full range with VNNI/AMX.
        *_tuned(
            Recipe(
                name="fused-int8",
                passes=[FUSED, PassRecord(name="int8_dynamic", config={"per_channel": True})],
            )
        ),
        # The same int8 with the nodes that break the gate fixed, cheapest first: token-wise int8,
        # else fp32 (needs a PassContext).
        *_tuned(
            Recipe(
                name="fused-int8-recovered",
                passes=[FUSED, PassRecord(name="mixed_precision", config={})],
            )
        ),
        # SmoothQuant first (fp32, same function; alpha searched by int8 cosine on the data),
        # then the same per-channel int8. Measured on all-MiniLM-L6-v2 (fused, 64 real
        # sentences): all-MatMul int8 min cosine on 120 short sentences 0.980 -> 0.994 at alpha
        # 0.7, but on 128-token texts (not in that calibration data) 0.985 -> 0.985: no better.
        *_tuned(
            Recipe(
                name="fused-smooth-int8",
                passes=[
                    FUSED,
                    SMOOTH,
                    PassRecord(name="int8_dynamic", config={"per_channel": True}),
                ],
            )
        ),
        *_tuned(
            Recipe(
                name="fused-smooth-int8-recovered",
                passes=[FUSED, SMOOTH, PassRecord(name="mixed_precision", config={})],
            )
        ),
        *_tuned(
            Recipe(name="cnn-int8", passes=[BASIC, PassRecord(name="int8_static", config=CNN_INT8)])
        ),
        *_tuned(
            Recipe(
                name="cnn-int8-recovered",
                passes=[
                    BASIC,
                    PassRecord(
                        name="mixed_precision",
                        config={"precision": "int8_static", "quant": CNN_INT8},
                    ),
                ],
            )
        ),
    ]
    if not has_vnni(hw):
        # Without VNNI, u8 weights (no saturation, full 8 bits) are the other candidate.
        recipes.append(
            Recipe(
                name="fused-int8-u8u8-tuned",
                passes=[
                    FUSED,
                    PassRecord(
                        name="int8_dynamic",
                        config={"weight_type": "QUInt8", "reduce_range": False},
                    ),
                    TUNED,
                ],
            )
        )
    return recipes


def cuda(hw: dict[str, Any]) -> list[Recipe]:
    gpu_fused = PassRecord(name="transformer_fusion", config={"use_gpu": True})
    return [
        Recipe(name="cuda", passes=[PassRecord(name="cuda")]),
        Recipe(name="cuda-fused", passes=[gpu_fused, PassRecord(name="cuda")]),
        Recipe(
            name="cuda-fused-fp16",
            passes=[gpu_fused, PassRecord(name="fp16"), PassRecord(name="cuda")],
        ),
        Recipe(
            name="cuda-fused-fp16-recovered",
            passes=[
                gpu_fused,
                PassRecord(name="mixed_precision", config={"precision": "fp16"}),
                PassRecord(name="cuda"),
            ],
        ),
    ]


def tensorrt(hw: dict[str, Any]) -> list[Recipe]:
    return [
        Recipe(name="tensorrt-fp16", passes=[PassRecord(name="tensorrt", config={"fp16": True})]),
        Recipe(name="tensorrt-fp32", passes=[PassRecord(name="tensorrt", config={"fp16": False})]),
        *cuda(hw),
    ]


PRESETS: dict[str, Callable[[dict[str, Any]], list[Recipe]]] = {
    "cpu": cpu,
    "cuda": cuda,
    "tensorrt": tensorrt,
}
