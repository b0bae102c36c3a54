"""Per-node quantization sensitivity measured with the gate's own metric (not a proxy).

:func:`error_ranking` quantizes candidate nodes one at a time (``mode="only"``: only that node
int8, the rest fp32) or all but one (``mode="all_but"``), runs the result on calibration data and
scores the node by the output error the gate would see: ``1 - min`` over samples of ``measure``
(per-sample cosine of the model's outputs against the fp32 reference by default; any callable
returning one score per sample, higher = closer, can plug in, e.g. another accuracy budget). Its
return type is the one of ``mixed_precision.activation_ranking``: ``(score, node)``, higher = more
sensitive, so the two rankings are interchangeable.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from bladeflow.core.environment import hardware
from bladeflow.tasks.optimize.int8_dynamic import (
    QuantizeDynamicConfig,
    quantize_dynamic_file,
    resolve,
)
from bladeflow.tasks.validate.data import Dataset, mask_padding

# (outputs, reference) -> one closeness score per sample, higher = closer (cosine: 1 is exact).
Measure = Callable[[Dataset, Dataset], np.ndarray]
# Builds ``output`` from ``source`` with ``excluded`` nodes kept in fp32 or, when ``only`` is
# given, with only those nodes quantized (the signature of mixed_precision's builders).
Quantizer = Callable[[Path, Path, Sequence[str], Sequence[str] | None], None]
Mode = Literal["only", "all_but"]


def cosine_measure(outputs: Dataset, reference: Dataset) -> np.ndarray:
    """Per-sample cosine of every output against the reference, worst output per sample."""
    worst: np.ndarray | None = None
    for name, ref in reference.items():
        a = np.asarray(outputs[name], dtype=np.float64).reshape(ref.shape[0], -1)
        b = np.asarray(ref, dtype=np.float64).reshape(ref.shape[0], -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        # two zero rows agree; one zero row against a non-zero one is as far as it gets (0)
        both_zero = (na == 0) & (nb == 0)
        cos = np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-30))
        worst = cos if worst is None else np.minimum(worst, cos)
    if worst is None:
        raise ValueError("the reference has no outputs to compare")
    return worst


def dynamic_int8(config: QuantizeDynamicConfig | None = None) -> Quantizer:
    """The default quantizer: int8_dynamic with this CPU's ISA choices (per-channel weights)."""
    resolved = resolve(config or QuantizeDynamicConfig(), hardware())
    return lambda s, o, ex, only: quantize_dynamic_file(s, o, resolved, ex, only)


def run_model(path: Path, data: Dataset, batch: int = 32) -> Dataset:
    """Outputs of the ONNX model at ``path`` over ``data`` (CPU, graph as written + ORT basic),
    per-token outputs zeroed at padding positions as the accuracy gate compares them."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    feeds = {k: v for k, v in data.items() if k in inputs}
    n = len(next(iter(feeds.values())))
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, n, batch):
        values = sess.run(names, {k: v[start : start + batch] for k, v in feeds.items()})
        for name, value in zip(names, values, strict=True):
            chunks[name].append(np.asarray(value))
    return mask_padding({k: np.concatenate(v) for k, v in chunks.items()}, data)


def error_ranking(
    model: onnx.ModelProto | Path,
    nodes: list[str],
    data: Dataset,
    work: Path,
    *,
    reference: Dataset | None = None,
    quantize: Quantizer | None = None,
    measure: Measure = cosine_measure,
    mode: Mode = "only",
) -> list[tuple[float, str]]:
    """(measured output error attributable to the node, node) for each node; higher = worse.

    Args:
        model: The fp32 model (a ModelProto or the path of one).
        nodes: Names of the candidate nodes (e.g. MatMul/Attention).
        data: Calibration inputs by name (a few worst-case samples are enough).
        work: A folder for the per-node models (each is deleted after it is measured).
        reference: Outputs to compare with; default: the fp32 ``model`` itself on ``data``.
        quantize: Builds a quantized model (default: :func:`dynamic_int8`).
        measure: Per-sample closeness, higher = closer (default: the gate's cosine).
        mode: ``"only"``: error with only this node quantized. ``"all_but"``: how much the error
            of the fully quantized model drops when this node alone stays fp32.

    One quantization and one inference per node (plus one for ``"all_but"``'s full attempt).
    """
    quantize = quantize or dynamic_int8()
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sens-", dir=work) as tmp:
        folder = Path(tmp)
        # Always a private copy: ORT's quantizer writes ``<model>-inferred.onnx`` beside its
        # input, so two quantizations of one shared file at once (parallel recipes) collide.
        source = folder / "fp32.onnx"
        if isinstance(model, onnx.ModelProto):
            onnx.save(model, str(source))
        else:
            shutil.copyfile(model, source)
        ref = reference if reference is not None else run_model(source, data)

        def error(excluded: Sequence[str], only: Sequence[str] | None) -> float:
            path = folder / "probe.onnx"
            quantize(source, path, excluded, only)
            score = measure(run_model(path, data), ref)
            path.unlink()
            return float(1.0 - np.min(score))

        if mode == "only":
            return [(error([], [node]), node) for node in nodes]
        full = error([], None)
        return [(full - error([node], None), node) for node in nodes]
