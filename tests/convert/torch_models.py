"""Tiny PyTorch models for the convert tests (imported lazily: torch loads only in torch tests)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ConvNet(nn.Module):
    """conv -> relu -> pool -> dense: image [batch, 3, 16, 16] -> logits [batch, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.head(x)


class Recurrent(nn.Module):
    """GRU + LSTM over a sequence [batch, seq, 6]; returns (sequence, last state)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 8, batch_first=True)
        self.lstm = nn.LSTM(8, 5, batch_first=True)

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.gru(seq)
        y, (last, _) = self.lstm(h)
        return y, last[0]


class TinyEncoder(nn.Module):
    """Embedding + masked self-attention + layer norm + MLP + masked mean over token ids."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.scale = dim**-0.5

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        m = attention_mask.to(h.dtype)
        scores = q @ k.transpose(1, 2) * self.scale + (1.0 - m[:, None, :]) * -1e4
        h = self.norm(h + scores.softmax(-1) @ v)
        h = h + self.mlp(h)
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)


class TracedShapes(nn.Module):
    """nn.TransformerEncoderLayer: the TorchScript tracer bakes its sequence length in."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layer(self.emb(input_ids))


class Svd(nn.Module):
    """Uses linalg.svd, which the TorchScript ONNX exporter does not support."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x).S


def build_encoder() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    return TinyEncoder(), {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def build_recurrent() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    return Recurrent(), {"seq": torch.randn(2, 5, 6)}


def build_traced_shapes() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    return TracedShapes(), {"input_ids": torch.randint(0, 50, (2, 7))}


def build_svd() -> tuple[nn.Module, dict[str, Any]]:
    return Svd(), {"x": torch.randn(2, 4, 4)}


def build_not_a_module() -> tuple[Any, dict[str, Any]]:
    return object(), {"x": torch.randn(1)}
