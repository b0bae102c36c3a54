"""Convert any supported model source to a verified ONNX model: the convert stage's entry point.

``convert_source`` detects the format, lets that format's converter export ONNX into a staging
folder, admits the result like any ONNX model (checker, shape inference, ONNX Runtime load),
verifies it numerically against the source framework, and only then moves it into ``workdir``:
a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
from pydantic import BaseModel, Field

from bladeflow.core.contract import ModelArtifact, PassRecord, Signature, TensorSpec, Tolerance
from bladeflow.core.errors import ModelFileError
from bladeflow.core.hashing import sha256_path
from bladeflow.tasks.convert.base import SourceRunner, check_size, get_converter
from bladeflow.tasks.convert.detect import detect_format
from bladeflow.tasks.convert.errors import ConversionError
from bladeflow.tasks.convert.seq2seq_source import FORMAT as SEQ2SEQ
from bladeflow.tasks.convert.seq2seq_source import convert_seq2seq
from bladeflow.tasks.convert.verify import verification_data, verify_conversion

__all__ = [
    "ConversionError",
    "ConvertOptions",
    "SourceRunner",
    "convert_source",
    "detect",
    "open_source_runner",
    "verify_conversion",
]

# Operator domains ONNX Runtime implements besides the default one.
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


class ConvertOptions(BaseModel):
    """How to read and export a source (all optional: defaults come from the source)."""

    format: str | None = Field(None, description="force a format key instead of detecting it")
    signature: str | None = Field(None, description="TensorFlow serving signature name")
    input_shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="example/fixed shape per input, e.g. x: [1,3,224,224]"
    )
    dynamic_axes: dict[str, dict[int, str]] | None = Field(
        None, description="input/output -> axis -> dim name; None: batch (and sequence) dynamic"
    )
    target_opset: int | None = Field(None, description="ONNX opset to export/convert to")
    weights: str | None = Field(
        None, description="Caffe: the .caffemodel for a .prototxt (default: same stem beside it)"
    )
    keep_initializer_inputs: bool = Field(
        False,
        description="keep weights that old exporters also list as graph inputs (for callers "
        "that feed weights); by default they are removed so ONNX Runtime can fold them",
    )
    tolerance: Tolerance = Field(
        default_factory=lambda: Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.999),
        description="how close ONNX Runtime must be to the source framework",
    )


def detect(source: str, fmt: str | None = None) -> str:
    """The format key of ``source``; ModelFileError lists the supported formats otherwise.

    An MLflow transformers model of a supported encoder-decoder (``models:/``, ``runs:/`` or a
    local MLflow model folder) is ``seq2seq``, not ``mlflow``: it needs the decoder loop.
    """
    from bladeflow.tasks.convert import mlflow_transformers

    if fmt in (None, "mlflow"):
        if mlflow_transformers.claims(source):
            return SEQ2SEQ
        mlflow_transformers.refuse_other_generation(source)  # a local MLflow folder of GPT-2...
    return detect_format(source, fmt)


def convert_source(source: str, workdir: Path, options: ConvertOptions) -> ModelArtifact:
    """Convert ``source`` to ``workdir/model.onnx`` (+ ``convert_config.json``), verified.

    Encoder-decoders (format ``seq2seq``) become ``encoder.onnx`` + ``decoder_with_past.onnx`` +
    ``seq2seq.json`` instead; the artifact's ``path`` is the ``seq2seq.json``.

    Raises:
        ModelFileError: unreadable/unsupported source or missing framework.
        ConversionError: export failed, unsupported operator, or outputs differ from the source.
    """
    fmt = detect(source, options.format)
    converter = get_converter(fmt)
    check_size(source)  # before anything loads it (the CLI also runs converter.precheck)
    if fmt == SEQ2SEQ:  # a folder of two graphs and a loop, verified by generation
        return convert_seq2seq(source, workdir, options)
    workdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=workdir))
    try:
        exported = converter.export(source, staging, options)
        if fmt != "onnx":  # ONNX sources: ONNX Runtime names unknown operators at load
            _check_operators(exported.onnx_path)
        from bladeflow.tasks.convert.onnx_source import load_onnx_source

        final = staging / "final"
        admitted = load_onnx_source(
            exported.onnx_path, final, options.target_opset, options.keep_initializer_inputs
        )
        signature = _with_value_ranges(admitted.signature, exported.value_ranges)
        step = PassRecord(
            name=f"convert.{fmt}",
            config={
                **options.model_dump(mode="json", exclude={"tolerance"}),
                "conversion_tolerance": options.tolerance.model_dump(),
                **(admitted.provenance.step.config if admitted.provenance.step else {}),
                **exported.config,
            },
        )
        parent = exported.hashed or (Path(source) if Path(source).exists() else None)
        artifact = admitted.model_copy(
            update={
                "signature": signature,
                "provenance": admitted.provenance.model_copy(
                    update={
                        "source": source,
                        "step": step,
                        "parent_sha256": sha256_path(parent) if parent else None,
                    }
                ),
            }
        )
        accuracy: dict[str, Any] = {}
        if exported.runner is not None:
            data = verification_data(signature, options.input_shapes)
            checked = verify_conversion(exported.runner, artifact, data, options.tolerance)
            accuracy = {k: v.model_dump() for k, v in checked.items()}
        verification = {
            "runner": exported.runner.name if exported.runner else None,
            "outputs": accuracy,
        }
        # The conversion error travels with the artifact: it ends up in the registered
        # version's bladeflow.recipe tag, next to the options that produced the model.
        step = step.model_copy(update={"config": {**step.config, "verification": verification}})
        artifact = artifact.model_copy(
            update={"provenance": artifact.provenance.model_copy(update={"step": step})}
        )
        (final / "convert_config.json").write_text(
            json.dumps({**step.model_dump(mode="json"), "verification": verification}, indent=2)
        )
        assets = {}
        for name, folder in exported.assets.items():
            shutil.copytree(folder, final / name, dirs_exist_ok=True)
            assets[name] = str(workdir / name)
        # Verified: move into place, replacing a previous conversion.
        for item in final.iterdir():
            target = workdir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(item), target)
        return artifact.model_copy(update={"path": str(workdir / "model.onnx"), "assets": assets})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_source_runner(
    source: str, options: ConvertOptions, artifact: ModelArtifact
) -> SourceRunner | None:
    """Load the source in its framework, for latency comparison; None for ONNX sources."""
    fmt = detect(source, options.format)
    return get_converter(fmt).open_runner(source, options, artifact)


def _with_value_ranges(signature: Signature, ranges: dict[str, list[float]]) -> Signature:
    inputs = [
        TensorSpec(**{**s.model_dump(), "value_range": ranges[s.name]}) if s.name in ranges else s
        for s in signature.inputs
    ]
    return Signature(inputs=inputs, outputs=signature.outputs)


def _check_operators(path: Path) -> None:
    """Name the first operator no ONNX runtime implements (a framework op left in the graph)."""
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        # e.g. an MLflow model whose model.onnx was cut off in the artifact store
        raise ModelFileError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}). The file may be "
            "truncated or corrupt: log or export the model again."
        ) from exc
    imports = {i.domain: i.version for i in model.opset_import}
    for node in model.graph.node:
        domain = node.domain or ""
        unknown = domain not in _KNOWN_DOMAINS or (
            domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)
        )
        if unknown:
            raise ConversionError(
                f"operator {node.op_type!r} (domain {domain or 'ai.onnx'!r}, node "
                f"{node.name!r}) has no ONNX equivalent at opset {imports.get('', '?')}. Try a "
                "newer target_opset, rewrite that part of the model with supported operations, or "
                "implement it as an ONNX Runtime custom op."
            )
