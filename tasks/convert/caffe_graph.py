"""The ONNX graph a Caffe net is translated into, and Caffe's parameter spellings.

Caffe blobs are mutable (in-place layers write their bottom); ONNX values are written once. The
graph maps each blob to the value that holds its latest version and names the final version of
every blob after it, so the ONNX outputs carry Caffe's blob names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.caffe_proto import Layer, Net


class Graph:
    """The ONNX graph under construction and where each Caffe blob's latest value lives."""

    def __init__(self, net: Net, input_shapes: dict[str, list[int]]):
        self.net = net
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, list[int]] = {}
        self.current: dict[str, str] = {}  # Caffe blob -> ONNX value holding its latest version
        self.static_batch = False
        self._count = 0
        writers: dict[str, int] = {}
        for layer in net.layers:
            for t in layer.tops:
                writers[t] = writers.get(t, 0) + 1
        self._writes_left = writers
        self._assigned: set[str] = set(net.inputs)
        for name, shape in net.inputs.items():
            self.current[name] = name
            self.shapes[name] = list(input_shapes.get(name) or shape)

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}__{self._count}"

    def const(self, hint: str, value: np.ndarray | np.generic) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value)), name))
        return name

    def ints(self, hint: str, values: list[int]) -> str:
        return self.const(hint, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def top(self, layer: Layer, index: int, value: str, shape: list[int]) -> None:
        """Give top ``index`` of ``layer`` the value ``value``; the last writer's value is named
        after the blob (so net outputs keep Caffe's blob names)."""
        blob = layer.tops[index]
        self._writes_left[blob] -= 1
        name = blob if self._writes_left[blob] == 0 and blob not in self.net.inputs else value
        last = self.nodes[-1] if self.nodes else None
        fresh = value not in self._assigned  # not yet the value of another blob
        if name != value and fresh and last is not None and list(last.output) == [value]:
            last.output[0] = name  # just produced and not read yet: rename in place
        elif name != value:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"{name}_out"))
        self.current[blob] = name
        self._assigned.add(name)
        self.shapes[name] = shape

    def bottom(self, layer: Layer, index: int = 0) -> tuple[str, list[int]]:
        blob = layer.bottoms[index]
        if blob not in self.current:
            raise ModelFileError(
                f"Caffe layer {layer.name!r} reads blob {blob!r}, which no earlier layer or "
                "input produces"
            )
        name = self.current[blob]
        return name, self.shapes[name]

    def weights(self, layer: Layer, count: int) -> list[np.ndarray]:
        if len(layer.blobs) < count:
            raise ModelFileError(
                f"Caffe layer {layer.name!r} ({layer.type}) needs {count} weight blob(s) but has "
                f"{len(layer.blobs)}: give the .caffemodel trained with this .prototxt (weights "
                "are matched to layers by name)"
            )
        return layer.blobs


def norm_axis(axis: int, rank: int, layer: Layer) -> int:
    if not -rank <= axis < rank:
        raise ModelFileError(
            f"Caffe layer {layer.name!r}: axis {axis} is out of range for {rank}-D"
        )
    return axis % rank


def spatial(p: Any, name: str, n: int, default: int, layer: Layer) -> list[int]:
    """Caffe's kernel/pad/stride spellings: name_h/name_w, or a repeated (or single) value."""
    if n == 2 and (p.HasField(f"{name}_h") or p.HasField(f"{name}_w")):
        return [int(getattr(p, f"{name}_h")), int(getattr(p, f"{name}_w"))]
    raw = getattr(p, name if name != "kernel" else "kernel_size")
    values = [raw] if isinstance(raw, int) else list(raw)  # pooling has one value
    if not values:
        return [default] * n
    if len(values) == 1:
        return [int(values[0])] * n
    if len(values) != n:
        raise ModelFileError(
            f"Caffe layer {layer.name!r}: {name} has {len(values)} values for {n}-D"
        )
    return [int(v) for v in values]
