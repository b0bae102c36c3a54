"""Shared TensorFlow -> ONNX export through tf2onnx, and the TensorFlow runner."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bladeflow.tasks.convert.errors import ConversionError, missing_framework

if TYPE_CHECKING:
    from bladeflow.tasks.convert.base import SourcePath
    from bladeflow.tasks.convert.dispatch import ConvertOptions

DEFAULT_OPSET = 17


def import_tf(fmt: str) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise missing_framework(fmt, "tensorflow-cpu", "tf", exc) from exc
    return tf


def import_tf2onnx(fmt: str) -> Any:
    try:
        import tf2onnx
    except ImportError as exc:
        raise missing_framework(fmt, "tf2onnx", "tf", exc) from exc
    return tf2onnx


def input_specs(
    tf: Any, discovered: list[tuple[str, list[int | None], Any]], options: ConvertOptions
) -> list[Any]:
    """tf.TensorSpecs for the inputs; ``input_shapes`` fixes dims, batch stays dynamic."""
    specs = []
    for name, shape, dtype in discovered:
        if name in options.input_shapes:
            fixed: list[int | None] = list(options.input_shapes[name])
            axes = (options.dynamic_axes or {}).get(name, {0: "batch"})
            shape = [None if i in axes else d for i, d in enumerate(fixed)]
        specs.append(tf.TensorSpec(shape, dtype, name=name))
    return specs


def convert_function(
    fn: Callable[..., Any], specs: list[Any], output: Path, options: ConvertOptions, fmt: str
) -> dict[str, Any]:
    """Convert a tf.function taking ``specs`` positionally; returns the resolved config."""
    tf = import_tf(fmt)
    tf2onnx = import_tf2onnx(fmt)
    opset = options.target_opset or DEFAULT_OPSET
    function = tf.function(fn, input_signature=specs, autograph=False)
    try:
        model_proto, _ = tf2onnx.convert.from_function(function, input_signature=specs, opset=opset)
    except (ValueError, TypeError, KeyError, RuntimeError, tf.errors.OpError) as exc:
        raise ConversionError(
            f"tf2onnx {tf2onnx.__version__} could not convert the {fmt} model: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. "
            "Try another target_opset; a tf.function that captures eager constants must use "
            "variables instead."
        ) from exc
    name_dims(model_proto, options)
    onnx.save(model_proto, str(output))
    return {
        "exporter": f"tf2onnx.convert.from_function {tf2onnx.__version__}",
        "opset": opset,
        "input_specs": {s.name: [None if d is None else int(d) for d in s.shape] for s in specs},
    }


def name_dims(model: onnx.ModelProto, options: ConvertOptions) -> None:
    """Give tf2onnx's anonymous dims (``unk__12``) readable names: batch on axis 0."""
    explicit = options.dynamic_axes or {}
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        wanted = explicit.get(value.name, {0: "batch"})
        for axis, dim in enumerate(dims):
            if axis in wanted and not dim.HasField("dim_value"):
                dim.dim_param = wanted[axis]


class TFRunner:
    """Calls a TensorFlow callable on numpy inputs; outputs mapped to the ONNX names.

    ``call`` computes the reference outputs (the model's own, exactly). ``served`` -- where the
    reference is an eager call -- is the same model as a TensorFlow service runs it: a graph
    function traced once (:class:`GraphCall`). Timing prefers the served path; the eager one is
    timed beside it. Without ``served``, ``call`` is itself what a service runs (a SavedModel
    signature is a graph ``ConcreteFunction``).
    """

    def __init__(
        self,
        call: Callable[[dict[str, Any]], dict[str, Any]],
        name: str,
        served: GraphCall | None = None,
        description: str = "",
    ):
        self.name = name
        self._call = call
        self.served = served
        self.description = description or name

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._call(feeds)
        return {k: np.asarray(v) for k, v in out.items()}

    def timing_paths(self, threads: int | None = None) -> list[SourcePath]:
        """Served path first (graph), then eager where the reference call is eager.

        ``threads`` is not applied: TensorFlow fixes its thread pools when its runtime starts (the
        convert stage already started it), so TF runs with its defaults (all logical cores).
        """
        from bladeflow.tasks.convert.base import EAGER, SERVED, SourcePath

        if self.served is None:
            return [SourcePath(SERVED, f"{self.description}, TF default threads", self)]
        served = self.served
        return [
            SourcePath(SERVED, f"{self.name} {served.description}, TF default threads", served),
            SourcePath(EAGER, f"{self.name} eager ({self.description})", self),
        ]


class GraphCall:
    """A model traced once into a TensorFlow graph, called on numpy feeds by input name.

    ``function`` is the ``tf.function`` (with an input signature whose batch dim is None, so one
    trace serves every batch size) and ``concrete`` its single ``ConcreteFunction`` -- the same
    kind of object a SavedModel's serving signature is, called directly so no per-call
    signature matching is timed either.
    """

    description = "tf.function (graph, traced once per input signature; as a SavedModel serves)"

    def __init__(self, tf: Any, fn: Callable[..., Any], specs: list[Any]):
        self.names = [str(s.name) for s in specs]
        self._dtypes = [s.dtype.as_numpy_dtype for s in specs]
        self.function = tf.function(fn, input_signature=specs)
        self._concrete: Any = None

    @property
    def concrete(self) -> Any:
        """The traced graph; traced on first use, so loading the model for its reference
        outputs never pays for (or fails on) tracing."""
        if self._concrete is None:
            self._concrete = self.function.get_concrete_function()
        return self._concrete

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        args = [
            np.asarray(feeds[n], dtype=d) for n, d in zip(self.names, self._dtypes, strict=True)
        ]
        out = self.concrete(*args)
        return {k: v.numpy() for k, v in out.items()}
