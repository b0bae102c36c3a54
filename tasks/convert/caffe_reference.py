"""A NumPy reference executor of Caffe nets: the verifier when OpenCV cannot load a net.

Each layer is computed the way Caffe's CPU code does it (pooling windows clipped exactly as in
``pooling_layer.cpp``, LRN's window as in ``lrn_layer.cpp``), independently of the ONNX
translation in caffe_onnx: only the parsed net (caffe_proto) is shared. It is written for
clarity, not speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from bladeflow.tasks.convert.caffe_proto import Layer, Net
from bladeflow.tasks.convert.errors import ConversionError

Array = np.ndarray


def _hw(p: Any, name: str, default: int) -> tuple[int, int]:
    """kernel/pad/stride as (h, w): name_h/name_w, else the one (pooling) or repeated value."""
    if p.HasField(f"{name}_h") or p.HasField(f"{name}_w"):
        return int(getattr(p, f"{name}_h")), int(getattr(p, f"{name}_w"))
    raw = getattr(p, "kernel_size" if name == "kernel" else name)
    if isinstance(raw, int):
        return raw, raw
    values = [int(v) for v in raw] or [default]
    return values[0], values[-1]


def convolution(x: Array, layer: Layer) -> Array:
    p = layer.param.convolution_param
    if x.ndim != 4:
        raise ConversionError(f"the NumPy reference runs 2-D convolutions only ({layer.name!r})")
    (kh, kw), (ph, pw), (sh, sw) = _hw(p, "kernel", 0), _hw(p, "pad", 0), _hw(p, "stride", 1)
    dil = list(p.dilation) or [1]
    dh, dw = int(dil[0]), int(dil[-1])
    group, cout, cin = int(p.group), int(p.num_output), x.shape[1]
    if layer.type == "Deconvolution":
        return _deconvolution(x, layer, (kh, kw), (ph, pw), (sh, sw), (dh, dw))
    w = layer.blobs[0].reshape(cout, cin // group, kh, kw)
    xp = np.pad(x, [(0, 0), (0, 0), (ph, ph), (pw, pw)])
    win = sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # N, C, OH, OW, KH, KW
    cg, og = cin // group, cout // group
    parts = [
        np.einsum("ncijkl,ockl->noij", win[:, g * cg : (g + 1) * cg], w[g * og : (g + 1) * og])
        for g in range(group)
    ]
    y = np.concatenate(parts, axis=1)
    if p.bias_term:
        y = y + layer.blobs[1].reshape(1, cout, 1, 1)
    return y


def _deconvolution(
    x: Array,
    layer: Layer,
    k: tuple[int, int],
    pad: tuple[int, int],
    s: tuple[int, int],
    d: tuple[int, int],
) -> Array:
    p = layer.param.convolution_param
    group, cout = int(p.group), int(p.num_output)
    n, cin, h, w_in = x.shape
    w = layer.blobs[0].reshape(cin, cout // group, *k)
    full_h, full_w = (
        s[0] * (h - 1) + d[0] * (k[0] - 1) + 1,
        s[1] * (w_in - 1) + d[1] * (k[1] - 1) + 1,
    )
    y = np.zeros((n, cout, full_h, full_w), np.float64)
    cg, og = cin // group, cout // group
    for g in range(group):
        xg = x[:, g * cg : (g + 1) * cg].astype(np.float64)
        for i in range(k[0]):
            for j in range(k[1]):
                contrib = np.einsum("nchw,co->nohw", xg, w[g * cg : (g + 1) * cg, :, i, j])
                y[
                    :,
                    g * og : (g + 1) * og,
                    i * d[0] : i * d[0] + s[0] * (h - 1) + 1 : s[0],
                    j * d[1] : j * d[1] + s[1] * (w_in - 1) + 1 : s[1],
                ] += contrib
    y = y[:, :, pad[0] : full_h - pad[0], pad[1] : full_w - pad[1]]
    if p.bias_term:
        y = y + layer.blobs[1].reshape(1, cout, 1, 1)
    return y.astype(np.float32)


def pooling(x: Array, layer: Layer) -> Array:
    p = layer.param.pooling_param
    n, c, h, w = x.shape
    if p.global_pooling:
        kh, kw, ph, pw, sh, sw = h, w, 0, 0, 1, 1
    else:
        (kh, kw), (ph, pw), (sh, sw) = _hw(p, "kernel", 0), _hw(p, "pad", 0), _hw(p, "stride", 1)
    rnd = math.ceil if p.round_mode == 0 else math.floor
    oh, ow = rnd((h + 2 * ph - kh) / sh) + 1, rnd((w + 2 * pw - kw) / sw) + 1
    if ph or pw:  # pooling_layer.cpp: the last window must start inside the image
        oh -= (oh - 1) * sh >= h + ph
        ow -= (ow - 1) * sw >= w + pw
    y = np.empty((n, c, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            size = (he - hs) * (we - ws)
            win = x[:, :, max(hs, 0) : min(he, h), max(ws, 0) : min(we, w)]
            if p.pool == 0:
                y[:, :, i, j] = win.max(axis=(2, 3))
            else:
                y[:, :, i, j] = win.sum(axis=(2, 3)) / size
    return y


def inner_product(x: Array, layer: Layer) -> Array:
    p = layer.param.inner_product_param
    axis = p.axis % x.ndim
    flat = x.reshape(*x.shape[:axis], -1)
    k = flat.shape[-1]
    w = layer.blobs[0].reshape(k, -1) if p.transpose else layer.blobs[0].reshape(-1, k).T
    y = flat @ w
    return y + layer.blobs[1].reshape(-1) if p.bias_term else y


def lrn(x: Array, layer: Layer) -> Array:
    p = layer.param.lrn_param
    size, pre = int(p.local_size), (int(p.local_size) - 1) // 2
    sq = x.astype(np.float64) ** 2
    if p.norm_region == 0:  # ACROSS_CHANNELS: k + alpha/size * sum over `size` channels
        sq = np.pad(sq, [(0, 0), (pre, size - pre - 1), (0, 0), (0, 0)])
        total = sum(sq[:, i : i + x.shape[1]] for i in range(size))
        return (x / (p.k + p.alpha / size * total) ** p.beta).astype(np.float32)
    # WITHIN_CHANNEL: 1 + alpha/size^2 * sum over a size x size window (zero padded)
    sq = np.pad(sq, [(0, 0), (0, 0), (pre, pre), (pre, pre)])
    win = sliding_window_view(sq, (size, size), axis=(2, 3)).sum(axis=(-2, -1))
    return (x / (1 + p.alpha / size**2 * win) ** p.beta).astype(np.float32)


def _span(x: Array, factor: Array, axis: int) -> Array:
    axis %= x.ndim
    return factor.reshape(factor.shape + (1,) * (x.ndim - axis - factor.ndim))


def scale(xs: list[Array], layer: Layer) -> Array:
    is_scale = layer.type == "Scale"
    p = layer.param.scale_param if is_scale else layer.param.bias_param
    x, blobs = xs[0], list(layer.blobs)
    axis = p.axis % x.ndim
    if len(xs) > 1:
        f = xs[1]
    else:
        count = x.ndim - axis if p.num_axes == -1 else p.num_axes
        f = blobs.pop(0).reshape(x.shape[axis : axis + count])
    if not is_scale:
        return x + _span(x, f, axis)
    y = x * _span(x, f, axis)
    return y + _span(x, blobs[0].reshape(f.shape), axis) if p.bias_term else y


def eltwise(xs: list[Array], layer: Layer) -> Array:
    p = layer.param.eltwise_param
    if p.operation == 0:
        return np.prod(np.stack(xs), axis=0)
    if p.operation == 2:
        return np.max(np.stack(xs), axis=0)
    coeff = list(p.coeff) or [1.0] * len(xs)
    return sum((c * v for c, v in zip(coeff, xs, strict=True)), np.zeros_like(xs[0]))


def batch_norm(x: Array, layer: Layer) -> Array:
    mean, var, factor = (b.reshape(-1) for b in layer.blobs[:3])
    f = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = layer.param.batch_norm_param.eps
    return (x - (mean * f).reshape(shape)) / np.sqrt((var * f).reshape(shape) + eps)


def softmax(x: Array, layer: Layer) -> Array:
    axis = layer.param.softmax_param.axis
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reshape(x: Array, layer: Layer) -> Array:
    if layer.type == "Flatten":
        p = layer.param.flatten_param
        a, e = p.axis % x.ndim, p.end_axis % x.ndim
        return x.reshape(*x.shape[:a], -1, *x.shape[e + 1 :])
    p = layer.param.reshape_param
    axis = p.axis if p.axis >= 0 else x.ndim + 1 + p.axis
    end = x.ndim if p.num_axes == -1 else axis + p.num_axes
    mid = [x.shape[axis + i] if d == 0 else int(d) for i, d in enumerate(p.shape.dim)]
    return x.reshape(*x.shape[:axis], *mid, *x.shape[end:])


def _prelu(x: Array, layer: Layer) -> Array:
    slope = layer.blobs[0].reshape(-1)
    s = (
        slope[0]
        if layer.param.prelu_param.channel_shared
        else slope.reshape((1, -1) + (1,) * (x.ndim - 2))
    )
    return np.where(x > 0, x, x * s)


def _power(x: Array, layer: Layer) -> Array:
    p = layer.param.power_param
    return (p.shift + p.scale * x) ** p.power


_ONE: dict[str, Callable[[Array, Layer], Array]] = {
    "Convolution": convolution, "Deconvolution": convolution, "Pooling": pooling,
    "InnerProduct": inner_product, "LRN": lrn, "BatchNorm": batch_norm, "Softmax": softmax,
    "Flatten": reshape, "Reshape": reshape, "PReLU": _prelu, "Power": _power,
    "ReLU": lambda x, lr: np.where(x > 0, x, x * lr.param.relu_param.negative_slope),
    "Sigmoid": lambda x, _: 1 / (1 + np.exp(-x)), "TanH": lambda x, _: np.tanh(x),
    "AbsVal": lambda x, _: np.abs(x), "Dropout": lambda x, _: x,
    "ELU": lambda x, lr: np.where(x > 0, x, lr.param.elu_param.alpha * (np.exp(x) - 1)),
}  # fmt: skip
_MANY: dict[str, Callable[[list[Array], Layer], Array]] = {
    "Scale": scale, "Bias": scale, "Eltwise": eltwise,
    "Concat": lambda xs, lr: np.concatenate(
        xs, axis=int(lr.param.concat_param.concat_dim) if lr.param.concat_param.HasField(
            "concat_dim") else lr.param.concat_param.axis),
}  # fmt: skip


class ReferenceRunner:
    """Runs a Caffe net layer by layer in NumPy (float32 blobs, as Caffe stores them)."""

    name = "numpy-caffe-reference"

    def __init__(self, net: Net, reason: str = ""):
        self.reason = reason  # why this runner verifies the net instead of OpenCV
        self._net = net
        self._outputs = [b for b in net.outputs() if b not in net.inputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = {n: np.asarray(feeds[n], np.float32) for n in self._net.inputs}
        for layer in self._net.layers:
            xs = [blobs[b] for b in layer.bottoms]
            if layer.type in _MANY:
                ys = [_MANY[layer.type](xs, layer)]
            elif layer.type in _ONE:
                ys = [_ONE[layer.type](xs[0], layer)]
            elif layer.type == "Split":
                ys = [xs[0]] * len(layer.tops)
            else:
                raise ConversionError(f"the NumPy reference has no {layer.type} ({layer.name!r})")
            for top, y in zip(layer.tops, ys, strict=True):
                blobs[top] = np.asarray(y, dtype=np.float32)
        return {b: blobs[b] for b in self._outputs}
