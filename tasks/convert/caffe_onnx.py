"""Build an ONNX graph from a Caffe net (see caffe_proto), one Caffe layer at a time.

Shapes are tracked statically from the declared inputs: Caffe's pooling output size depends on
them (ceil rounding, and a last window that would start in the padding is dropped), which ONNX
expresses with explicit end padding. The batch axis stays dynamic unless a layer mixes it with
other axes (a Reshape or Flatten over axis 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.caffe_graph import Graph, norm_axis, spatial
from bladeflow.tasks.convert.caffe_proto import Layer, Net
from bladeflow.tasks.convert.errors import ConversionError

DEFAULT_OPSET = 17


def unsupported(layer: Layer, what: str) -> ConversionError:
    return ConversionError(
        f"Caffe layer {layer.name!r} of type {layer.type}: {what}. bladeflow converts "
        f"{', '.join(sorted(_HANDLERS))}; remove or replace that layer in the deploy .prototxt."
    )


def _conv(g: Graph, layer: Layer) -> None:
    p = layer.param.convolution_param
    x, shape = g.bottom(layer)
    n = len(shape) - 2
    if p.axis != 1:
        raise unsupported(layer, f"convolution over axis {p.axis} (only 1)")
    k = spatial(p, "kernel", n, 0, layer)
    pads, strides = spatial(p, "pad", n, 0, layer), spatial(p, "stride", n, 1, layer)
    dil = [int(d) for d in p.dilation] or [1]
    dil = dil * n if len(dil) == 1 else dil
    group, cout, cin = int(p.group), int(p.num_output), shape[1]
    blobs = g.weights(layer, 2 if p.bias_term else 1)
    deconv = layer.type == "Deconvolution"
    wshape = [cin, cout // group, *k] if deconv else [cout, cin // group, *k]
    w = blobs[0].reshape(wshape)
    inputs = [x, g.const(f"{layer.name}_W", w)]
    if p.bias_term:
        inputs.append(g.const(f"{layer.name}_b", blobs[1].reshape(cout)))
    ext = [d * (kk - 1) + 1 for d, kk in zip(dil, k, strict=True)]
    if deconv:
        sp = [
            s * (i - 1) + e - 2 * pd
            for i, s, e, pd in zip(shape[2:], strides, ext, pads, strict=True)
        ]
    else:
        sp = [
            (i + 2 * pd - e) // s + 1
            for i, s, e, pd in zip(shape[2:], strides, ext, pads, strict=True)
        ]
    op = "ConvTranspose" if deconv else "Conv"
    out = g.node(
        op,
        inputs,
        layer.name,
        kernel_shape=k,
        pads=pads + pads,
        strides=strides,
        dilations=dil,
        group=group,
    )
    g.top(layer, 0, out, [shape[0], cout, *sp])


def _pool(g: Graph, layer: Layer) -> None:
    p = layer.param.pooling_param
    x, shape = g.bottom(layer)
    if p.pool not in (0, 1):
        raise unsupported(layer, "STOCHASTIC pooling")
    if p.global_pooling:
        op = "GlobalMaxPool" if p.pool == 0 else "GlobalAveragePool"
        g.top(layer, 0, g.node(op, [x], layer.name), [*shape[:2], 1, 1])
        return
    k, pads = spatial(p, "kernel", 2, 0, layer), spatial(p, "pad", 2, 0, layer)
    strides = spatial(p, "stride", 2, 1, layer)
    out = pool_output_size(shape[2:], k, pads, strides, ceil=p.round_mode == 0)
    # end padding that makes ONNX's floor rule give Caffe's size (never negative: fewer rows
    # than the window covers are simply not read)
    extra = [
        max((o - 1) * s + kk - i - 2 * pd, 0)
        for o, s, kk, i, pd in zip(out, strides, k, shape[2:], pads, strict=True)
    ]
    if p.pool == 0:  # MAX: padding never wins, like Caffe's clipped window
        y = g.node(
            "MaxPool",
            [x],
            layer.name,
            kernel_shape=k,
            strides=strides,
            pads=pads + [pd + e for pd, e in zip(pads, extra, strict=True)],
        )
    else:  # AVE: Caffe divides by the window clipped to input+pad, so pad with real zeros
        if any(pads):
            x = g.node("Pad", [x, g.ints("pads", [0, 0, *pads, 0, 0, *pads])], layer.name + "_pad")
        y = g.node(
            "AveragePool",
            [x],
            layer.name,
            kernel_shape=k,
            strides=strides,
            pads=[0, 0, *extra],
            count_include_pad=0,
        )
    g.top(layer, 0, y, [*shape[:2], *out])


def pool_output_size(
    size: list[int], k: list[int], pads: list[int], strides: list[int], ceil: bool = True
) -> list[int]:
    """Caffe's pooled size: ceil rounding, minus a last window that starts in the padding."""
    out = []
    for i, kk, pd, s in zip(size, k, pads, strides, strict=True):
        o = (math.ceil if ceil else math.floor)((i + 2 * pd - kk) / s) + 1
        if ceil and any(pads) and (o - 1) * s >= i + pd:
            o -= 1
        out.append(int(o))
    return out


def _inner_product(g: Graph, layer: Layer) -> None:
    p = layer.param.inner_product_param
    x, shape = g.bottom(layer)
    axis = norm_axis(p.axis, len(shape), layer)
    kdim, n = int(np.prod(shape[axis:])), int(p.num_output)
    blobs = g.weights(layer, 2 if p.bias_term else 1)
    w = blobs[0].reshape((kdim, n) if p.transpose else (n, kdim))
    w = w if p.transpose else w.T  # (K, N)
    if axis == 0:
        g.static_batch = True
    flat = g.node("Reshape", [x, g.ints("shape", [0] * axis + [-1])], layer.name + "_flat")
    y = g.node("MatMul", [flat, g.const(f"{layer.name}_W", w)], layer.name)
    if p.bias_term:
        y = g.node("Add", [y, g.const(f"{layer.name}_b", blobs[1].reshape(n))], layer.name)
    g.top(layer, 0, y, [*shape[:axis], n])


def _channel_shape(c: np.ndarray, rank: int) -> np.ndarray:
    return c.reshape([-1] + [1] * (rank - 2))


def _batch_norm(g: Graph, layer: Layer) -> None:
    p = layer.param.batch_norm_param
    x, shape = g.bottom(layer)
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise unsupported(layer, "use_global_stats: false (statistics of the batch at inference)")
    c = shape[1]
    mean, var, factor = g.weights(layer, 3)[:3]
    mean, var, factor = mean.reshape(c), var.reshape(c), factor.reshape(-1)
    scale = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    stats = [
        g.const("bn_one", np.ones(c, np.float32)),
        g.const("bn_zero", np.zeros(c, np.float32)),
        g.const(f"{layer.name}_mean", mean * scale),
        g.const(f"{layer.name}_var", var * scale),
    ]
    y = g.node("BatchNormalization", [x, *stats], layer.name, epsilon=float(p.eps))
    g.top(layer, 0, y, shape)


def _scale_or_bias(g: Graph, layer: Layer) -> None:
    """Scale (x * s [+ b]) and Bias (x + b): s/b span axes [axis, axis+num_axes) of x."""
    is_scale = layer.type == "Scale"
    p = layer.param.scale_param if is_scale else layer.param.bias_param
    x, shape = g.bottom(layer)
    axis = norm_axis(p.axis, len(shape), layer)
    blobs = list(layer.blobs)
    if len(layer.bottoms) > 1:
        factor, fshape = g.bottom(layer, 1)
        span = len(fshape)
    else:
        span = len(shape) - axis if p.num_axes == -1 else int(p.num_axes)
        fshape = shape[axis : axis + span]
        g.static_batch |= axis == 0  # a learned factor per sample fixes the batch size
        factor = g.const(
            f"{layer.name}_{'s' if is_scale else 'b'}", g.weights(layer, 1)[0].reshape(fshape)
        )
        blobs = blobs[1:]
    trailing = list(range(axis + span, len(shape)))
    if trailing:
        factor = g.node(
            "Unsqueeze", [factor, g.ints("axes", [a - axis for a in trailing])], layer.name
        )
    y = g.node("Mul" if is_scale else "Add", [x, factor], layer.name)
    if is_scale and p.bias_term:
        if not blobs:
            raise ModelFileError(
                f"Caffe layer {layer.name!r}: bias_term is set but it has no bias blob"
            )
        bias = blobs[0].reshape(fshape + [1] * len(trailing))
        y = g.node("Add", [y, g.const(f"{layer.name}_b", bias)], layer.name)
    g.top(layer, 0, y, shape)


def _eltwise(g: Graph, layer: Layer) -> None:
    p = layer.param.eltwise_param
    xs = [g.bottom(layer, i) for i in range(len(layer.bottoms))]
    names, shape = [v for v, _ in xs], xs[0][1]
    coeff = list(p.coeff)
    if coeff and (p.operation != 1 or len(coeff) != len(names)):
        raise ModelFileError(
            f"Caffe layer {layer.name!r}: Eltwise coeff needs SUM and one value per bottom "
            f"({len(names)}), got {len(coeff)}"
        )
    if p.operation == 1:
        if any(c != 1 for c in coeff):
            names = [
                g.node("Mul", [v, g.const("coeff", np.float32(c))], layer.name)
                for v, c in zip(names, coeff, strict=True)
            ]
        y = g.node("Sum", names, layer.name)
    elif p.operation == 2:
        y = g.node("Max", names, layer.name)
    else:
        y = names[0]
        for v in names[1:]:
            y = g.node("Mul", [y, v], layer.name)
    g.top(layer, 0, y, shape)


def _concat(g: Graph, layer: Layer) -> None:
    p = layer.param.concat_param
    xs = [g.bottom(layer, i) for i in range(len(layer.bottoms))]
    rank = len(xs[0][1])
    axis = norm_axis(int(p.concat_dim) if p.HasField("concat_dim") else p.axis, rank, layer)
    shape = list(xs[0][1])
    shape[axis] = sum(s[axis] for _, s in xs)
    g.top(layer, 0, g.node("Concat", [v for v, _ in xs], layer.name, axis=axis), shape)


def _flatten(g: Graph, layer: Layer) -> None:
    p = layer.param.flatten_param
    x, shape = g.bottom(layer)
    a, e = norm_axis(p.axis, len(shape), layer), norm_axis(p.end_axis, len(shape), layer)
    out = [*shape[:a], int(np.prod(shape[a : e + 1])), *shape[e + 1 :]]
    _reshape_to(g, layer, x, out, keep_batch=a > 0)


def _reshape(g: Graph, layer: Layer) -> None:
    p = layer.param.reshape_param
    x, shape = g.bottom(layer)
    axis = norm_axis(p.axis, len(shape) + 1, layer) if p.axis < 0 else p.axis
    end = len(shape) if p.num_axes == -1 else axis + p.num_axes
    spec = [int(d) for d in p.shape.dim]
    mid = [shape[axis + i] if d == 0 else d for i, d in enumerate(spec)]
    out = [*shape[:axis], *mid, *shape[end:]]
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(shape)) // max(known, 1)
    keep = axis > 0 or (bool(spec) and spec[0] == 0)
    _reshape_to(g, layer, x, out, keep_batch=keep)


def _reshape_to(g: Graph, layer: Layer, x: str, out: list[int], keep_batch: bool) -> None:
    if not keep_batch:
        g.static_batch = True
    target = [0, *out[1:]] if keep_batch else out
    g.top(layer, 0, g.node("Reshape", [x, g.ints("shape", target)], layer.name), out)


def _unary(op: str, **attrs: Any) -> Callable[[Graph, Layer], None]:
    def handler(g: Graph, layer: Layer) -> None:
        x, shape = g.bottom(layer)
        g.top(layer, 0, g.node(op, [x], layer.name, **attrs), shape)

    return handler


def _relu(g: Graph, layer: Layer) -> None:
    slope = float(layer.param.relu_param.negative_slope)
    (_unary("LeakyRelu", alpha=slope) if slope else _unary("Relu"))(g, layer)


def _prelu(g: Graph, layer: Layer) -> None:
    x, shape = g.bottom(layer)
    shared = layer.param.prelu_param.channel_shared
    slope = g.weights(layer, 1)[0].reshape(1 if shared else shape[1])
    slope = slope if shared else _channel_shape(slope, len(shape))
    g.top(layer, 0, g.node("PRelu", [x, g.const(f"{layer.name}_slope", slope)], layer.name), shape)


def _lrn(g: Graph, layer: Layer) -> None:
    p = layer.param.lrn_param
    size = int(p.local_size)
    if size % 2 == 0:
        raise unsupported(layer, f"LRN local_size {size} (Caffe itself needs an odd size)")
    if p.norm_region == 0:
        attrs = {"size": size, "alpha": float(p.alpha), "beta": float(p.beta), "bias": float(p.k)}
        _unary("LRN", **attrs)(g, layer)
        return
    # WITHIN_CHANNEL, as lrn_layer.cpp builds it: x / (1 + alpha * avgpool_size(x^2))^beta
    x, shape = g.bottom(layer)
    pad = [(size - 1) // 2] * 4
    sq = g.node("Mul", [x, x], layer.name)
    avg = g.node("AveragePool", [sq], layer.name, kernel_shape=[size, size], pads=pad,
                 count_include_pad=1)  # fmt: skip
    scaled = g.node("Mul", [avg, g.const("alpha", np.float32(p.alpha))], layer.name)
    base = g.node("Add", [scaled, g.const("one", np.float32(1.0))], layer.name)
    denom = g.node("Pow", [base, g.const("beta", np.float32(p.beta))], layer.name)
    g.top(layer, 0, g.node("Div", [x, denom], layer.name), shape)


def _softmax(g: Graph, layer: Layer) -> None:
    x, shape = g.bottom(layer)
    axis = norm_axis(layer.param.softmax_param.axis, len(shape), layer)
    g.top(layer, 0, g.node("Softmax", [x], layer.name, axis=axis), shape)


def _power(g: Graph, layer: Layer) -> None:
    p = layer.param.power_param
    y, shape = g.bottom(layer)
    if p.scale != 1:
        y = g.node("Mul", [y, g.const("scale", np.float32(p.scale))], layer.name)
    if p.shift != 0:
        y = g.node("Add", [y, g.const("shift", np.float32(p.shift))], layer.name)
    if p.power != 1:
        y = g.node("Pow", [y, g.const("power", np.float32(p.power))], layer.name)
    g.top(layer, 0, g.node("Identity", [y], layer.name), shape)


def _identity(g: Graph, layer: Layer) -> None:
    x, shape = g.bottom(layer)
    for i in range(len(layer.tops)):  # Split has several tops; Dropout is identity at TEST
        g.top(layer, i, g.node("Identity", [x], layer.name), shape)


_HANDLERS: dict[str, Callable[[Graph, Layer], None]] = {
    "AbsVal": _unary("Abs"), "BatchNorm": _batch_norm, "Bias": _scale_or_bias,
    "Concat": _concat, "Convolution": _conv, "Deconvolution": _conv, "Dropout": _identity,
    "ELU": lambda g, layer: _unary("Elu", alpha=float(layer.param.elu_param.alpha))(g, layer),
    "Eltwise": _eltwise, "Flatten": _flatten, "InnerProduct": _inner_product, "LRN": _lrn,
    "Pooling": _pool, "Power": _power, "PReLU": _prelu, "ReLU": _relu, "Reshape": _reshape,
    "Scale": _scale_or_bias, "Sigmoid": _unary("Sigmoid"), "Softmax": _softmax,
    "Split": _identity, "TanH": _unary("Tanh"),
}  # fmt: skip


def check_layers(net: Net) -> None:
    """Refuse the first layer whose type has no ONNX translation here (no weights needed)."""
    for layer in net.layers:
        if layer.type not in _HANDLERS:
            raise unsupported(layer, "this layer type is not supported")


def build_onnx(
    net: Net,
    input_shapes: dict[str, list[int]],
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """The ONNX model of ``net`` and its output blob names (dynamic batch when possible).

    Raises:
        ConversionError: a layer type or mode with no translation (names layer and type).
        ModelFileError: missing weights, dangling blobs, bad axes.
    """
    check_layers(net)
    g = Graph(net, input_shapes)
    for layer in net.layers:
        try:
            _HANDLERS[layer.type](g, layer)
        except ValueError as exc:  # numpy: a weight blob that does not fit the layer
            raise ModelFileError(
                f"Caffe layer {layer.name!r} ({layer.type}): its weights do not fit its input "
                f"{g.shapes.get(g.current.get(layer.bottoms[0], ''), '?')} ({exc}); the "
                ".caffemodel does not belong to this .prototxt, or input shapes are wrong"
            ) from exc
    outputs = [b for b in net.outputs() if b not in net.inputs]
    batch: str | int = "batch" if dynamic_batch and not g.static_batch else 0

    def info(name: str) -> onnx.ValueInfoProto:
        shape = list(g.shapes[name])
        dims: list[str | int] = [batch or shape[0], *shape[1:]] if shape else []
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph = helper.make_graph(
        g.nodes,
        net.name or "caffe",
        [info(n) for n in net.inputs],
        [info(g.current[b]) for b in outputs],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset or DEFAULT_OPSET)],
        producer_name="bladeflow-caffe",
    )
    return model, outputs
