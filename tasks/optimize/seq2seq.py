"""Candidates of an encoder-decoder folder (encoder.onnx + decoder_with_past.onnx + seq2seq.json).

``fp32``: the exported graphs with ONNX Runtime's graph optimizations (level ``all``) at load.
``int8-decoder``: the decoder's MatMul weights quantized to int8 (dynamic, per channel), the
encoder untouched: the decoder runs once per token, so its weight bytes are what decoding reads.
The generation gate judges it by agreement (reduced precision), not by exact match.
``ort-beam-search-op`` (text models): ONNX Runtime's contrib BeamSearch op wrapping the same two
graphs (``search_op.py``), the whole loop in C++; fp32, so judged by exact match like ``fp32``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bladeflow.core.contract import Candidate, ModelArtifact, PassRecord, SessionConfig
from bladeflow.core.generation import DECODER_FILE
from bladeflow.core.hashing import sha256_path

FP32 = "fp32"
INT8_DECODER = "int8-decoder"
REDUCED = {INT8_DECODER}  # candidates judged by the reduced-precision budget


def build_candidates(model: ModelArtifact, workdir: Path) -> tuple[list[Candidate], dict[str, str]]:
    """Every candidate of ``model`` and, for those that failed to build, the reason.

    The search-op candidate is built for text models only (the op's encoder-decoder path takes
    token ids); for speech models it is simply not a candidate.
    """
    from bladeflow.tasks.optimize.search_op import CANDIDATE as SEARCH_OP
    from bladeflow.tasks.optimize.search_op import search_op_candidate

    built, failed = [fp32_candidate(model)], {}
    builders = {INT8_DECODER: lambda: int8_decoder_candidate(model, workdir)}
    if model.signature.inputs[0].name == "input_ids":
        builders[SEARCH_OP] = lambda: search_op_candidate(model, workdir)
    for name, build in builders.items():
        try:
            built.append(build())
        except Exception as exc:  # noqa: BLE001 - the candidate is rejected with its reason
            failed[name] = f"{type(exc).__name__}: {exc}"
    return built, failed


def fp32_candidate(model: ModelArtifact) -> Candidate:
    """The exported folder as is, ONNX Runtime optimizing both graphs at load."""
    session = SessionConfig(graph_optimization_level="all")
    return Candidate(
        name=FP32,
        artifact=model,
        session=session,
        recipe=[PassRecord(name="ort_graph", config={"level": "all", "graphs": "both"})],
    )


def int8_decoder_candidate(model: ModelArtifact, workdir: Path) -> Candidate:
    """A copy of the folder whose decoder has int8 dynamic-quantized MatMul weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = Path(model.path).parent
    out = workdir / INT8_DECODER
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(DECODER_FILE))
    config = {"op_types": ["MatMul"], "per_channel": True, "weight_type": "QInt8"}
    quantize_dynamic(
        str(src / DECODER_FILE),
        str(out / DECODER_FILE),
        op_types_to_quantize=config["op_types"],
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    artifact = model.model_copy(
        update={
            "path": str(out / Path(model.path).name),
            "sha256": sha256_path(out / DECODER_FILE),
            "size_bytes": sum(f.stat().st_size for f in out.glob("*.onnx")),
            "assets": {k: str(out / Path(v).name) for k, v in model.assets.items()},
        }
    )
    return Candidate(
        name=INT8_DECODER,
        artifact=artifact,
        session=SessionConfig(graph_optimization_level="all"),
        recipe=[PassRecord(name="int8_dynamic", config={**config, "graph": DECODER_FILE})],
    )
