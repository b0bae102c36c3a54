"""ONNX Runtime's contrib ``BeamSearch`` / ``GreedySearch`` op (com.microsoft) around our graphs.

The whole decoding loop then runs in C++ inside one ``session.run``: the op takes the encoder
and the decoder-with-past as subgraph attributes, the T5-style way (``model_type=1``), as
``onnxruntime/transformers/convert_generation.py`` builds it for T5/BART (read for the approach,
not imported: that module's exporters pin an older transformers). What the op requires of the
subgraphs, and what :func:`build_search_model` rewrites in copies of ``encoder.onnx`` and
``decoder_with_past.onnx`` to get there:

* encoder: inputs ``encoder_input_ids``, ``encoder_attention_mask`` as **int32**; outputs only
  ``present_key_cross_{i}`` / ``present_value_cross_{i}`` (the "new format": cross keys/values,
  which is what our encoder returns). Ours take int64 ``input_ids``/``attention_mask``: the
  inputs are renamed, retyped to int32 and cast back to int64 inside the graph.
* decoder: inputs ``input_ids`` (int32, ``(B, 1)``), ``encoder_attention_mask`` (int32),
  ``past_key_self_{i}``/``past_value_self_{i}`` for every layer, then
  ``past_key_cross_{i}``/``past_value_cross_{i}``; outputs ``logits`` ``(B, 1, V)`` and
  ``present_key_self_{i}``/``present_value_self_{i}``. Same renaming and casts.

Text models only: speech (Whisper-type) models take float features, which the op's T5 path
does not accept (its Whisper path, ``model_type=2``, expects ORT's own Whisper export layout).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bladeflow.core.contract import Candidate, ModelArtifact, PassRecord, SessionConfig
from bladeflow.core.errors import ModelFileError
from bladeflow.core.generation import DECODER_FILE, ENCODER_FILE, SPEC_FILE, Seq2SeqSpec
from bladeflow.core.hashing import sha256_path
from bladeflow.core.search_op import SEARCH_FILE

BEAM_SEARCH = "BeamSearch"
GREEDY_SEARCH = "GreedySearch"
OPS = (BEAM_SEARCH, GREEDY_SEARCH)
CANDIDATE = "ort-beam-search-op"
_T5_MODEL_TYPE = 1  # the op's model_type for encoder-decoders (0: GPT-2, 2: Whisper)


def build_search_model(folder: str | Path, out: str | Path, op: str = BEAM_SEARCH) -> Path:
    """Write ``out`` (one ONNX model: the search op with our encoder and decoder inside).

    Args:
        folder: An exported seq2seq folder (``encoder.onnx``, ``decoder_with_past.onnx``,
            ``seq2seq.json``).
        out: The file to write.
        op: ``BeamSearch`` or ``GreedySearch``.

    Raises:
        ModelFileError: a speech model, or an op name that is not one of :data:`OPS`.
    """
    import onnx
    from onnx import TensorProto, helper

    if op not in OPS:
        raise ModelFileError(f"search op must be one of {OPS}, not {op!r}")
    root = Path(folder)
    spec = Seq2SeqSpec.load(root / SPEC_FILE)
    if spec.kind != "text":
        raise ModelFileError(
            f"{root} is a {spec.kind} model; ONNX Runtime's search op wraps text encoder-decoders "
            "(int32 token ids in) only"
        )
    n = spec.num_layers
    encoder = onnx.load(str(root / ENCODER_FILE))
    decoder = onnx.load(str(root / DECODER_FILE))
    _retype_int_inputs(
        encoder.graph,
        {"input_ids": "encoder_input_ids", "attention_mask": "encoder_attention_mask"},
    )
    _rename_outputs(encoder.graph, dict(zip(spec.cross_names(), _cross(n, "present"), strict=True)))
    _retype_int_inputs(
        decoder.graph,
        {"input_ids": "input_ids", "encoder_attention_mask": "encoder_attention_mask"},
    )
    _rename_inputs(
        decoder.graph,
        dict(zip(spec.past_names(), _self(n, "past"), strict=True))
        | dict(zip(spec.cross_names(), _cross(n, "past"), strict=True)),
    )
    _rename_outputs(
        decoder.graph, dict(zip(spec.present_names(), _self(n, "present"), strict=True))
    )
    _order_inputs(
        decoder.graph,
        ["input_ids", "encoder_attention_mask", *_self(n, "past"), *_cross(n, "past")],
    )
    encoder.graph.name, decoder.graph.name = "encoder", "decoder"

    beam = op == BEAM_SEARCH
    names = ["input_ids", "max_length", "min_length"]
    names += ["num_beams", "num_return_sequences", "length_penalty"] if beam else []
    names += ["repetition_penalty", "", "", "attention_mask"]  # no vocab/prefix masks
    node = helper.make_node(
        op, inputs=names, outputs=["sequences"], name=f"{op}_seq2seq", domain="com.microsoft"
    )
    attrs: dict[str, Any] = {
        "eos_token_id": spec.eos_token_id,
        "pad_token_id": spec.pad_token_id,
        "decoder_start_token_id": spec.decoder_start_token_id,
        "model_type": _T5_MODEL_TYPE,
        "no_repeat_ngram_size": 0,
        "encoder": encoder.graph,
        "decoder": decoder.graph,
    }
    if beam:
        attrs["early_stopping"] = 0
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    scalar = {
        "max_length": TensorProto.INT32,
        "min_length": TensorProto.INT32,
        "num_beams": TensorProto.INT32,
        "num_return_sequences": TensorProto.INT32,
        "length_penalty": TensorProto.FLOAT,
        "repetition_penalty": TensorProto.FLOAT,
    }
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "src_len"])]
    inputs += [helper.make_tensor_value_info(k, scalar[k], [1]) for k in names if k in scalar]
    inputs.append(
        helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "src_len"])
    )
    shape = ["batch", "num_return_sequences", "max_length"] if beam else ["batch", "max_length"]
    outputs = [helper.make_tensor_value_info("sequences", TensorProto.INT32, shape)]
    graph = helper.make_graph([node], f"seq2seq {op}", inputs, outputs)
    opsets = [o for o in decoder.opset_import if o.domain not in ("com.microsoft",)]
    opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, producer_name="bladeflow", opset_imports=opsets)
    model.ir_version = decoder.ir_version
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


def search_op_candidate(model: ModelArtifact, workdir: Path, op: str = BEAM_SEARCH) -> Candidate:
    """A copy of the exported folder with ``search.onnx`` (the search op over both graphs)."""
    src = Path(model.path).parent
    out = workdir / CANDIDATE
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    build_search_model(out, out / SEARCH_FILE, op)
    artifact = model.model_copy(
        update={
            "path": str(out / Path(model.path).name),
            "sha256": sha256_path(out / SEARCH_FILE),
            "size_bytes": (out / SEARCH_FILE).stat().st_size,
            "assets": {k: str(out / Path(v).name) for k, v in model.assets.items()},
        }
    )
    return Candidate(
        name=CANDIDATE,
        artifact=artifact,
        session=SessionConfig(graph_optimization_level="all"),
        recipe=[PassRecord(name="ort_search_op", config={"op": op, "file": SEARCH_FILE})],
    )


# -- graph surgery --------------------------------------------------------------------------


def _self(n: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}_self_{i}" for i in range(n) for kv in ("key", "value")]


def _cross(n: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}_cross_{i}" for i in range(n) for kv in ("key", "value")]


def _rename_everywhere(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]


def _rename_inputs(graph: Any, names: dict[str, str]) -> None:
    for value in graph.input:
        if value.name in names:
            old, value.name = value.name, names[value.name]
            _rename_everywhere(graph, old, value.name)


def _rename_outputs(graph: Any, names: dict[str, str]) -> None:
    for value in graph.output:
        if value.name in names:
            old, value.name = value.name, names[value.name]
            _rename_everywhere(graph, old, value.name)


def _retype_int_inputs(graph: Any, names: dict[str, str]) -> None:
    """Graph input ``old`` (int64) becomes int32 input ``new``, cast to int64 under the old name
    for the nodes that read it."""
    from onnx import TensorProto, helper

    casts = []
    for value in graph.input:
        if value.name not in names:
            continue
        old, new = value.name, names[value.name]
        inner = f"{old}__int64"
        _rename_everywhere(graph, old, inner)
        value.name = new
        value.type.tensor_type.elem_type = TensorProto.INT32
        casts.append(helper.make_node("Cast", [new], [inner], to=TensorProto.INT64))
    for node in reversed(casts):
        graph.node.insert(0, node)


def _order_inputs(graph: Any, order: list[str]) -> None:
    by_name = {v.name: v for v in graph.input}
    missing = [n for n in order if n not in by_name]
    if missing or len(order) != len(by_name):
        raise ModelFileError(
            f"the decoder graph's inputs {sorted(by_name)} do not match what the search op needs "
            f"({order})"
        )
    copies = [type(by_name[n])() for n in order]
    for copy, name in zip(copies, order, strict=True):
        copy.CopyFrom(by_name[name])
    del graph.input[:]
    graph.input.extend(copies)
