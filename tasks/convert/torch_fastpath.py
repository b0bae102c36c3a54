"""ONNX symbolics for PyTorch's fused fast-path ops, decomposed into standard ONNX operators.

In eval mode ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` run fused kernels, and a
trace (TorchScript) records them as single ops the TorchScript exporter has no symbolic for:
``aten::_transformer_encoder_layer_fwd`` and ``aten::_native_multi_head_attention``. Their
arguments carry everything the unfused modules compute (packed q/k/v projection, output
projection, layer norms, feed-forward), so each is rewritten here as MatMul/Add/Reshape/Transpose/
Softmax/LayerNormalization, the pattern ONNX Runtime's transformer optimizer fuses again. The
conversion is verified against the TorchScript module like any other.
"""

from __future__ import annotations

import math
from typing import Any

# The symbolics use Slice/Split with tensor inputs and Softmax on the last axis (opset 13).
MIN_OPSET = 13
FUSED_OPS = ("aten::_transformer_encoder_layer_fwd", "aten::_native_multi_head_attention")
# PyTorch's mask_type: 0 = attn_mask (L, S); 1 = key padding (B, S); 2 = merged (B, H, L, S).
_KEY_PADDING = 1

_registered = False


def register_fastpath_symbolics() -> None:
    """Register the decompositions with torch.onnx (once per process; TorchScript exporter)."""
    global _registered
    if _registered:
        return
    import torch

    torch.onnx.register_custom_op_symbolic(FUSED_OPS[0], _encoder_layer, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic(FUSED_OPS[1], _multi_head_attention, MIN_OPSET)
    _registered = True


def _const(g: Any, values: list[int] | list[float] | float, dtype: Any = None) -> Any:
    import torch

    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


def _int(value: Any) -> int:
    from torch.onnx import symbolic_helper

    return int(symbolic_helper._get_const(value, "i", "int argument"))


def _float(value: Any) -> float:
    from torch.onnx import symbolic_helper

    return float(symbolic_helper._get_const(value, "f", "float argument"))


def _bool(value: Any) -> bool:
    from torch.onnx import symbolic_helper

    return bool(symbolic_helper._get_const(value, "b", "bool argument"))


def _is_none(value: Any) -> bool:
    from torch.onnx import symbolic_helper

    return bool(symbolic_helper._is_none(value))


def _linear(g: Any, x: Any, weight: Any, bias: Any) -> Any:
    """x @ weight.T + bias (weights are constants: the transpose is folded at export)."""
    y = g.op("MatMul", x, g.op("Transpose", weight, perm_i=[1, 0]))
    return y if _is_none(bias) else g.op("Add", y, bias)


def _rows(g: Any, tensor: Any, start: int, end: int) -> Any:
    """tensor[start:end] along axis 0 (q/k/v parts of the packed projection)."""
    import torch

    i64 = torch.int64
    return g.op(
        "Slice", tensor, _const(g, [start], i64), _const(g, [end], i64), _const(g, [0], i64)
    )


def _layer_norm(g: Any, x: Any, weight: Any, bias: Any, eps: float) -> Any:
    if g.opset >= 17:
        return g.op("LayerNormalization", x, weight, bias, axis_i=-1, epsilon_f=eps)
    mean = g.op("ReduceMean", x, axes_i=[-1])
    centered = g.op("Sub", x, mean)
    var = g.op("ReduceMean", g.op("Mul", centered, centered), axes_i=[-1])
    std = g.op("Sqrt", g.op("Add", var, _const(g, eps)))
    return g.op("Add", g.op("Mul", g.op("Div", centered, std), weight), bias)


def _heads(g: Any, x: Any, heads: int, head_dim: int, perm: list[int]) -> Any:
    """[B, L, E] -> [B, L, H, D] -> transposed by ``perm``."""
    import torch

    shaped = g.op("Reshape", x, _const(g, [0, 0, heads, -1], torch.int64))
    return g.op("Transpose", shaped, perm_i=perm)


def _additive_mask(g: Any, mask: Any, mask_type: Any) -> Any:
    """The mask as a float tensor added to the [B, H, L, S] scores (-inf where masked)."""
    import torch

    kind = mask.type().scalarType() if mask.type() is not None else None
    if kind == "Bool":
        mask = g.op("Where", mask, _const(g, -math.inf), _const(g, 0.0))
    if not _is_none(mask_type) and _int(mask_type) == _KEY_PADDING:
        mask = g.op("Unsqueeze", mask, _const(g, [1, 2], torch.int64))  # [B, 1, 1, S]
    return mask


def _attention(
    g: Any,
    query: Any,
    key: Any,
    value: Any,
    embed_dim: int,
    heads: int,
    qkv_weight: Any,
    qkv_bias: Any,
    proj_weight: Any,
    proj_bias: Any,
    mask: Any,
    mask_type: Any,
) -> tuple[Any, Any]:
    """Multi-head attention on batch-first inputs; returns (output, per-head probabilities)."""
    import torch

    head_dim = embed_dim // heads
    parts = [(0, embed_dim), (embed_dim, 2 * embed_dim), (2 * embed_dim, 3 * embed_dim)]
    w = [_rows(g, qkv_weight, a, b) for a, b in parts]
    b = [_rows(g, qkv_bias, a, b) if not _is_none(qkv_bias) else qkv_bias for a, b in parts]
    q = _heads(g, _linear(g, query, w[0], b[0]), heads, head_dim, [0, 2, 1, 3])
    k = _heads(g, _linear(g, key, w[1], b[1]), heads, head_dim, [0, 2, 3, 1])
    v = _heads(g, _linear(g, value, w[2], b[2]), heads, head_dim, [0, 2, 1, 3])
    scores = g.op("Mul", g.op("MatMul", q, k), _const(g, 1.0 / math.sqrt(head_dim)))
    if not _is_none(mask):
        scores = g.op("Add", scores, _additive_mask(g, mask, mask_type))
    probs = g.op("Softmax", scores, axis_i=-1)
    context = g.op("Transpose", g.op("MatMul", probs, v), perm_i=[0, 2, 1, 3])
    merged = g.op("Reshape", context, _const(g, [0, 0, -1], torch.int64))
    return _linear(g, merged, proj_weight, proj_bias), probs


def _multi_head_attention(
    g: Any,
    query: Any,
    key: Any,
    value: Any,
    embed_dim: Any,
    num_head: Any,
    qkv_weight: Any,
    qkv_bias: Any,
    proj_weight: Any,
    proj_bias: Any,
    mask: Any = None,
    need_weights: Any = None,
    average_attn_weights: Any = None,
    mask_type: Any = None,
) -> tuple[Any, Any]:
    """aten::_native_multi_head_attention -> (output, attention weights)."""
    out, probs = _attention(
        g,
        query,
        key,
        value,
        _int(embed_dim),
        _int(num_head),
        qkv_weight,
        qkv_bias,
        proj_weight,
        proj_bias,
        mask,
        mask_type,
    )
    average = average_attn_weights is None or _is_none(average_attn_weights)
    if average or _bool(average_attn_weights):
        probs = g.op("ReduceMean", probs, axes_i=[1], keepdims_i=0)
    return out, probs


def _encoder_layer(
    g: Any,
    src: Any,
    embed_dim: Any,
    num_heads: Any,
    qkv_weight: Any,
    qkv_bias: Any,
    proj_weight: Any,
    proj_bias: Any,
    use_gelu: Any,
    norm_first: Any,
    eps: Any,
    norm_weight_1: Any,
    norm_bias_1: Any,
    norm_weight_2: Any,
    norm_bias_2: Any,
    ffn_weight_1: Any,
    ffn_bias_1: Any,
    ffn_weight_2: Any,
    ffn_bias_2: Any,
    mask: Any = None,
    mask_type: Any = None,
) -> Any:
    """aten::_transformer_encoder_layer_fwd (batch first, dropout off) -> its output."""
    epsilon = _float(eps)
    gelu = _bool(use_gelu)

    def attend(x: Any) -> Any:
        out, _ = _attention(
            g,
            x,
            x,
            x,
            _int(embed_dim),
            _int(num_heads),
            qkv_weight,
            qkv_bias,
            proj_weight,
            proj_bias,
            mask,
            mask_type,
        )
        return out

    def feed_forward(x: Any) -> Any:
        hidden = _linear(g, x, ffn_weight_1, ffn_bias_1)
        if gelu:  # exact (erf) GELU, as PyTorch's fused kernel computes it
            erf = g.op("Erf", g.op("Div", hidden, _const(g, math.sqrt(2.0))))
            half = g.op("Mul", hidden, _const(g, 0.5))
            hidden = g.op("Mul", half, g.op("Add", erf, _const(g, 1.0)))
        else:
            hidden = g.op("Relu", hidden)
        return _linear(g, hidden, ffn_weight_2, ffn_bias_2)

    def norm1(x: Any) -> Any:
        return _layer_norm(g, x, norm_weight_1, norm_bias_1, epsilon)

    def norm2(x: Any) -> Any:
        return _layer_norm(g, x, norm_weight_2, norm_bias_2, epsilon)

    if _bool(norm_first):
        x = g.op("Add", src, attend(norm1(src)))
        return g.op("Add", x, feed_forward(norm2(x)))
    x = norm1(g.op("Add", src, attend(src)))
    return norm2(g.op("Add", x, feed_forward(x)))
