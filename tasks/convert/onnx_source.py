"""Convert (admit) an ONNX model: check it, infer shapes, record its signature."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from bladeflow.core.contract import (
    Dim,
    ModelArtifact,
    PassRecord,
    Provenance,
    Signature,
    TensorSpec,
)
from bladeflow.core.environment import tool_versions
from bladeflow.core.errors import ModelFileError
from bladeflow.core.hashing import sha256_path
from bladeflow.core.runtime import make_session, run
from bladeflow.tasks.convert.base import Converter, Export, check_size

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

# Protobuf cannot serialize a single message over 2 GiB; bigger models keep weights outside.
_EXTERNAL_DATA_THRESHOLD = 1 << 30
_PROTOBUF_LIMIT = 2 << 30


def load_onnx_source(
    source: str | Path, workdir: Path, target_opset: int | None = None
) -> ModelArtifact:
    """Admit an ONNX model: validate it and write a shape-inferred copy to ``workdir``.

    Args:
        source: Path to a ``.onnx`` file (weights may live in external data files beside it).
        workdir: Folder for the converted model and the config that produced it.
        target_opset: Upgrade (or downgrade) the default-domain opset with
            ``onnx.version_converter`` first; None keeps the model's opset.

    Returns:
        The converted model, whose provenance names ``source`` and its sha256.

    Raises:
        ModelFileError: missing, empty, not ONNX, fails the ONNX checker, or ONNX Runtime cannot
            load it.
    """
    path = Path(source)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes): the export or copy did not finish")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise ModelFileError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}). The file may be "
            "truncated or corrupt, or not an ONNX protobuf: re-export it."
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise ModelFileError(f"{path} parsed as ONNX but has no graph: it is not an ONNX model")
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(
            f"{path} fails the ONNX checker: {_first_line(exc)}. Fix or re-export the model."
        ) from exc

    original_opset = opset_of(model)
    if target_opset and target_opset != original_opset:
        model = _convert_opset(model, target_opset, path)

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        inferred = model  # inference is a help, not a requirement: ORT infers at load too

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "model.onnx"
    large = inferred.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        inferred,
        str(out),
        save_as_external_data=large,
        location="model.onnx.data" if large else None,
    )
    make_session(out)  # fail here, naming the file, if ONNX Runtime cannot run it

    step = PassRecord(
        name="convert.onnx",
        config={
            "shape_inference": inferred is not model,
            "opset": opset_of(inferred),
            "source_opset": original_opset,
            "external_data": large,
        },
    )
    (workdir / "convert_config.json").write_text(json.dumps(step.model_dump(), indent=2))
    return ModelArtifact(
        path=str(out),
        format="onnx",
        sha256=sha256_path(out),
        size_bytes=_size(out),
        signature=signature_of(inferred),
        provenance=Provenance(
            source=str(source),
            parent_sha256=sha256_path(path),
            step=step,
            tool_versions=tool_versions(),
        ),
    )


def _convert_opset(model: onnx.ModelProto, target: int, path: Path) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, target)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelFileError(
            f"cannot convert {path} from opset {opset_of(model)} to opset {target}: "
            f"{_first_line(exc)}. Pick another target_opset (the ONNX version converter supports "
            "only some operator/opset pairs) or re-export the model at that opset."
        ) from exc


class OnnxConverter(Converter):
    """Admits an ONNX model as it is (optionally at another opset)."""

    format = "onnx"
    description = "an ONNX model file (.onnx, external data beside it)"
    order = 10

    @classmethod
    def claims(cls, source: str) -> bool:
        path = Path(source)
        return path.is_file() and path.suffix.lower() == ".onnx"

    @classmethod
    def precheck(cls, source: str) -> None:
        check_size(source)
        path = Path(source)
        if path.is_file() and path.stat().st_size > _PROTOBUF_LIMIT:
            raise ModelFileError(
                f"{path} is {path.stat().st_size / (1 << 30):.1f} GiB in one file, but an ONNX "
                "protobuf cannot exceed 2 GiB: it is corrupt, or was saved without external data. "
                "Save it with onnx.save_model(model, path, save_as_external_data=True)."
            )

    def export(self, source: str, workdir: Path, options: ConvertOptions) -> Export:
        # The file is admitted as is; an opset change is checked against the original in ORT.
        runner = OrtRunner(source) if options.target_opset else None
        return Export(onnx_path=Path(source), runner=runner)


class OrtRunner:
    """Runs an ONNX file in ONNX Runtime without graph optimizations (the reference)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path):
        from bladeflow.core.contract import SessionConfig

        self._session = make_session(path, SessionConfig(graph_optimization_level="disable"))
        self._outputs = [o.name for o in self._session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self._session, feeds, self._outputs)


def signature_of(model: onnx.ModelProto) -> Signature:
    """Input/output names, dtypes and shapes (dynamic dims by name) of an ONNX graph."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
    return Signature(inputs=inputs, outputs=[_spec(v) for v in model.graph.output])


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ModelFileError(
            f"input/output {value.name!r} is not a tensor (sequence or map types are not "
            "supported); wrap the model so it takes and returns tensors"
        )
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    dims: list[Dim] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(name=value.name, dtype=dtype, shape=dims)


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
