"""Traced TorchScript with PyTorch's fused fast-path ops converts to standard ONNX, verified."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from bladeflow.core.contract import SessionConfig
from bladeflow.core.runtime import make_session
from bladeflow.tasks.convert.dispatch import ConvertOptions, convert_source

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.torch

EMBED, SEQ = 16, 5


def _trace(module: Any, example: tuple[Any, ...], path: Path, fused_op: str) -> Path:
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert fused_op in kinds, f"the trace did not record {fused_op} (PyTorch changed?)"
    traced.save(str(path))
    return path


class _Encoder(nn.Module):
    def __init__(self, norm_first: bool, activation: str) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            EMBED,
            2,
            32,
            dropout=0.0,
            activation=activation,
            batch_first=True,
            norm_first=norm_first,
        )
        self.encoder = nn.TransformerEncoder(
            layer, 2, norm=nn.LayerNorm(EMBED), enable_nested_tensor=False
        )

    def forward(self, x: Any) -> Any:
        return self.encoder(x)


class _MaskedEncoder(_Encoder):
    """Masks computed inside the model (a TorchScript file's inputs are float32 here)."""

    def __init__(self, mask: str) -> None:
        super().__init__(False, "relu")
        self.mask = mask

    def forward(self, x: Any) -> Any:
        if self.mask == "causal":  # attn_mask (L, L): mask_type 0
            causal = nn.Transformer.generate_square_subsequent_mask(x.size(1))
            return self.encoder(x, mask=causal)
        return self.encoder(x, src_key_padding_mask=x[:, :, 0] > 1.5)  # (B, S): mask_type 1


class _SelfAttention(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(EMBED, 4, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x: Any) -> Any:
        out, weights = self.attn(x, x, x, need_weights=self.need_weights)
        return (out, weights) if self.need_weights else out


def _ops(path: str) -> set[str]:
    return {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}


def _rerun_at_another_length(art_path: str, ts_path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Max |ONNX Runtime - TorchScript| on inputs of a length the export never saw."""
    session = make_session(art_path, SessionConfig(graph_optimization_level="disable"))
    got = session.run(None, feeds)
    module = torch.jit.load(str(ts_path)).eval()
    with torch.no_grad():
        want = module(*(torch.from_numpy(v) for v in feeds.values()))
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize(
    ("norm_first", "activation"), [(False, "relu"), (True, "gelu")], ids=["post-relu", "pre-gelu"]
)
def test_traced_transformer_encoder_converts(tmp_path: Path, norm_first: bool, activation: str):
    # setup
    torch.manual_seed(0)
    src = _trace(
        _Encoder(norm_first, activation),
        (torch.randn(2, SEQ, EMBED),),
        tmp_path / "encoder.pt",
        "aten::_transformer_encoder_layer_fwd",
    )
    # execute
    art = convert_source(
        str(src), tmp_path / "work", ConvertOptions(input_shapes={"x": [2, SEQ, EMBED]})
    )
    # assert: standard ONNX only, verified against the TorchScript file itself
    config = json.loads((tmp_path / "work" / "convert_config.json").read_text())
    assert config["verification"]["runner"] == "torchscript"
    assert config["verification"]["outputs"]["output"]["max_abs_error"] < 1e-4
    ops = _ops(art.path)
    assert {"MatMul", "Softmax", "LayerNormalization"} <= ops
    assert all(onnx.defs.has(op) for op in ops)
    x = np.random.default_rng(1).standard_normal((3, 9, EMBED)).astype(np.float32)
    assert _rerun_at_another_length(art.path, src, {"x": x}) < 1e-4


@pytest.mark.parametrize("mask", ["causal", "key-padding"])
def test_traced_encoder_with_mask_converts(tmp_path: Path, mask: str):
    # setup
    torch.manual_seed(1)
    src = _trace(
        _MaskedEncoder(mask),
        (torch.randn(2, SEQ, EMBED),),
        tmp_path / "masked.pt",
        "aten::_transformer_encoder_layer_fwd",
    )
    # execute
    art = convert_source(
        str(src), tmp_path / "work", ConvertOptions(input_shapes={"x": [2, SEQ, EMBED]})
    )
    # assert: masked positions are ignored the same way in both, at another length too
    config = json.loads((tmp_path / "work" / "convert_config.json").read_text())
    assert config["verification"]["outputs"]["output"]["max_abs_error"] < 1e-4
    x = np.random.default_rng(2).standard_normal((2, 7, EMBED)).astype(np.float32)
    assert _rerun_at_another_length(art.path, src, {"x": x}) < 1e-4


@pytest.mark.parametrize("need_weights", [False, True], ids=["output", "with-weights"])
def test_traced_multihead_attention_converts(tmp_path: Path, need_weights: bool):
    # setup
    torch.manual_seed(2)
    src = _trace(
        _SelfAttention(need_weights),
        (torch.randn(2, SEQ, EMBED),),
        tmp_path / "mha.pt",
        "aten::_native_multi_head_attention",
    )
    # execute
    art = convert_source(
        str(src), tmp_path / "work", ConvertOptions(input_shapes={"x": [2, SEQ, EMBED]})
    )
    # assert
    config = json.loads((tmp_path / "work" / "convert_config.json").read_text())
    errors = [o["max_abs_error"] for o in config["verification"]["outputs"].values()]
    assert len(errors) == (2 if need_weights else 1) and max(errors) < 1e-4
    assert "Softmax" in _ops(art.path)
    x = np.random.default_rng(3).standard_normal((1, 8, EMBED)).astype(np.float32)
    assert _rerun_at_another_length(art.path, src, {"x": x}) < 1e-4
