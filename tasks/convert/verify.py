"""Numerical verification of a conversion: source framework and ONNX Runtime, same inputs."""

from __future__ import annotations

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtError

from bladeflow.core.contract import ModelArtifact, OutputAccuracy, Signature, TensorSpec, Tolerance
from bladeflow.tasks.convert.base import SourceRunner
from bladeflow.tasks.convert.errors import ConversionError
from bladeflow.tasks.validate.accuracy import REFERENCE_SESSION, compare, predict
from bladeflow.tasks.validate.data import Dataset, batches, fixed_batch, synthesize
from bladeflow.tasks.validate.labels import as_text

VERIFY_SAMPLES = 4
_SOURCE_BATCH = 8


def verification_data(
    signature: Signature, input_shapes: dict[str, list[int]], samples: int = VERIFY_SAMPLES
) -> Dataset:
    """Inputs synthesized from the signature (``input_shapes`` fix the non-batch dims)."""
    specs = []
    for spec in signature.inputs:
        shape = input_shapes.get(spec.name)
        if shape:
            dims: list[int | str | None] = [spec.shape[0] if spec.shape else "batch", *shape[1:]]
            spec = TensorSpec(
                name=spec.name, dtype=spec.dtype, shape=dims, value_range=spec.value_range
            )
        specs.append(spec)
    return synthesize(Signature(inputs=specs, outputs=signature.outputs), samples=samples)


def run_source(runner: SourceRunner, data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """Outputs of the source over the dataset, concatenated along the sample axis.

    String outputs (e.g. class labels) become ``numpy.str_`` arrays, as :func:`predict` gives
    them for the ONNX model, so the two compare by equality and save without pickling.
    """
    chunks: dict[str, list[np.ndarray]] = {}
    for part in batches(data, batch):
        for name, value in runner(part).items():
            chunks.setdefault(name, []).append(as_text(np.asarray(value)))
    return {n: np.concatenate(v) if len(v) > 1 and v[0].ndim else v[0] for n, v in chunks.items()}


def verify_conversion(
    runner: SourceRunner, artifact: ModelArtifact, data: Dataset, tolerance: Tolerance
) -> dict[str, OutputAccuracy]:
    """Run source and ONNX model on ``data``; per-output error, or ConversionError.

    Raises:
        ConversionError: an output is missing, has another shape, or differs beyond ``tolerance``.
    """
    names = [o.name for o in artifact.signature.outputs]
    try:
        converted = predict(artifact, REFERENCE_SESSION, data)
    except OrtError as exc:
        shapes = {k: list(v.shape) for k, v in data.items()}
        raise ConversionError(
            f"the converted model fails in ONNX Runtime on inputs shaped {shapes}: "
            f"{_first_line(exc)}. The export probably fixed a size that should be dynamic (a "
            "traced shape): export with input_shapes set to the shapes you serve, with "
            "dynamic_axes={} for a fixed-shape model, or rewrite the shape-dependent code."
        ) from exc
    source = run_source(runner, data, fixed_batch(artifact.signature) or _SOURCE_BATCH)
    missing = [n for n in names if n not in source]
    if missing:
        raise ConversionError(
            f"the {runner.name} source gave no output(s) {missing} (it gave {sorted(source)}); "
            "the converted model's outputs do not line up with the source's"
        )
    report = compare("conversion", converted, {n: source[n] for n in names}, tolerance, False)
    if not report.passed:
        raise ConversionError(
            f"the ONNX conversion of {artifact.provenance.source} does not match {runner.name}: "
            f"{report.reason}. Nothing was written. Try another opset (target_opset), export "
            "with fixed shapes (input_shapes) or, if the difference is expected, a looser "
            "conversion tolerance."
        )
    return report.outputs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
