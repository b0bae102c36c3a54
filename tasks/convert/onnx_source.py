"""Convert (admit) an ONNX model: check and normalize it, infer shapes, record its signature."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail

from bladeflow.core.contract import (
    Dim,
    ModelArtifact,
    PassRecord,
    Provenance,
    SessionConfig,
    Signature,
    TensorSpec,
)
from bladeflow.core.environment import tool_versions
from bladeflow.core.errors import ModelFileError
from bladeflow.core.hashing import sha256_path
from bladeflow.core.runtime import make_session, run
from bladeflow.tasks.convert.base import Converter, Export, check_size
from bladeflow.tasks.convert.normalize import (
    INT8_BLOCKED,
    check_runnable_ops,
    needs_normalization,
    normalize,
    opset_of,
)

if TYPE_CHECKING:
    from bladeflow.tasks.convert.dispatch import ConvertOptions

# Protobuf cannot serialize a single message over 2 GiB; bigger models keep weights outside.
_EXTERNAL_DATA_THRESHOLD = 1 << 30
_PROTOBUF_LIMIT = 2 << 30


def load_onnx_source(
    source: str | Path,
    workdir: Path,
    target_opset: int | None = None,
    keep_initializer_inputs: bool = False,
) -> ModelArtifact:
    """Admit an ONNX model: validate and normalize it, write a shape-inferred copy to ``workdir``.

    Normalization (see :mod:`bladeflow.tasks.convert.normalize`) takes weights out of the graph
    inputs and upgrades old opsets for the quantizers; what it did is recorded in the step's config
    under ``normalize`` (and ``int8_blocked`` when the opset had to stay too old for int8).

    Args:
        source: Path to a ``.onnx`` file (weights may live in external data files beside it).
        workdir: Folder for the converted model and the config that produced it.
        target_opset: Convert the default-domain opset to exactly this with
            ``onnx.version_converter``; None upgrades opsets below 13 where the converter can.
        keep_initializer_inputs: Keep weights that are also listed as graph inputs (for callers
            that feed weights at run time).

    Returns:
        The converted model, whose provenance names ``source`` and its sha256.

    Raises:
        ModelFileError: missing, empty, not ONNX, fails the ONNX checker, uses operators ONNX
            Runtime does not implement, or ONNX Runtime cannot load it.
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
    check_runnable_ops(model, path)

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "model.onnx"
    norm = normalize(model, path, target_opset, keep_initializer_inputs)
    why = None
    try:
        inferred, large = _save(norm.model, out)
    except ModelFileError as exc:
        if not norm.auto_upgraded:
            raise
        why = f"ONNX Runtime could not load the upgraded graph: {_first_line(exc)}"
    if norm.auto_upgraded and why is None:
        why = _upgrade_changes_outputs(model, path, out, keep_initializer_inputs)
    if why:  # the automatic upgrade failed where it counts: keep the old opset, say why
        norm = normalize(model, path, None, keep_initializer_inputs, no_upgrade_because=why)
        inferred, large = _save(norm.model, out)

    step = PassRecord(
        name="convert.onnx",
        config={
            "shape_inference": inferred is not norm.model,
            "opset": opset_of(inferred),
            "source_opset": norm.source_opset,
            "external_data": large,
            "normalize": norm.record(),
            **({INT8_BLOCKED: norm.int8_blocked} if norm.int8_blocked else {}),
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


def _upgrade_changes_outputs(
    model: onnx.ModelProto, path: Path, upgraded: Path, keep_initializer_inputs: bool
) -> str | None:
    """Why the automatically upgraded graph at ``upgraded`` is not faithful, or None.

    ONNX's version converter can change what an operator computes (e.g. opset 7 Upsample
    'linear' became a Resize with other coordinates), so both graphs run in ONNX Runtime on
    synthesized inputs. Inputs the graph cannot take leave the judgement to the verification
    against the source that follows.
    """
    from bladeflow.core.contract import Tolerance
    from bladeflow.tasks.validate.accuracy import compare
    from bladeflow.tasks.validate.data import synthesize

    kept = normalize(model, path, None, keep_initializer_inputs, no_upgrade_because="-").model
    if kept.ByteSize() > _PROTOBUF_LIMIT:
        return None
    config = SessionConfig(graph_optimization_level="disable")
    new = make_session(upgraded, config)
    old = _session_from_bytes(path, kept.SerializeToString(), config)
    data = synthesize(signature_of(kept), samples=2)
    names = [o.name for o in old.get_outputs()]
    try:
        before = run(old, data, names)
        after = run(new, data, names)
    except (ValueError, RuntimeError, OrtFail):
        return None
    report = compare("upgrade", after, before, Tolerance(), True)
    if report.passed:
        return None
    return f"ONNX's version converter changed the model's outputs ({report.reason[:200]})"


def _save(model: onnx.ModelProto, out: Path) -> tuple[onnx.ModelProto, bool]:
    """Shape-infer ``model``, write it to ``out`` and check that ONNX Runtime loads it."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        inferred = model  # inference is a help, not a requirement: ORT infers at load too
    large = inferred.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        inferred,
        str(out),
        save_as_external_data=large,
        location="model.onnx.data" if large else None,
    )
    make_session(out)  # fail here, naming the file, if ONNX Runtime cannot run it
    return inferred, large


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
        # Normalization happens at admission (load_onnx_source); when it will change the graph,
        # the result is verified against the original file in ONNX Runtime, like any pass.
        try:
            graph = onnx.load(source, load_external_data=False)
        except (DecodeError, ValueError, OSError, RuntimeError):
            graph = None  # unreadable: load_onnx_source reports it, naming the file
        changes = graph is not None and needs_normalization(
            graph, options.target_opset, options.keep_initializer_inputs
        )
        if graph is not None:
            check_runnable_ops(graph, Path(source))  # before the original is run
        return Export(onnx_path=Path(source), runner=LazyOrtRunner(source) if changes else None)


class LazyOrtRunner:
    """An :class:`OrtRunner` of the original file, loaded on first use (after admission)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path):
        self._path = path
        self._runner: OrtRunner | None = None

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is None:
            try:
                self._runner = OrtRunner(self._path)
            except ModelFileError:
                # ORT cannot read some tensors from external data while it loads a file (e.g. a
                # Reshape shape that is also a graph input): retry with the weights inlined.
                model = onnx.load(str(self._path), load_external_data=True)
                if model.ByteSize() > _PROTOBUF_LIMIT:
                    raise
                self._runner = OrtRunner(self._path, model.SerializeToString())
        return self._runner(feeds)


class OrtRunner:
    """Runs an ONNX file in ONNX Runtime without graph optimizations (the reference)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, model_bytes: bytes | None = None):
        config = SessionConfig(graph_optimization_level="disable")
        if model_bytes is None:
            self._session = make_session(path, config)
        else:
            self._session = _session_from_bytes(path, model_bytes, config)
        self._outputs = [o.name for o in self._session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self._session, feeds, self._outputs)


def _session_from_bytes(path: str | Path, data: bytes, config: SessionConfig) -> Any:
    import onnxruntime as ort

    from bladeflow.core.runtime import LOAD_ERRORS, session_options

    try:
        return ort.InferenceSession(
            data, sess_options=session_options(config), providers=["CPUExecutionProvider"]
        )
    except LOAD_ERRORS as exc:
        raise ModelFileError(
            f"ONNX Runtime {ort.__version__} cannot load {path} (weights inlined): "
            f"{_first_line(exc)}"
        ) from exc


def signature_of(model: onnx.ModelProto) -> Signature:
    """Input/output names, dtypes and shapes (dynamic dims by name) of an ONNX graph."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
    return Signature(inputs=inputs, outputs=[_spec(v) for v in model.graph.output])


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
