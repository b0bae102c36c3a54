"""The generate() breakdown: encoder, first step, per-token time and the bandwidth bound."""

from __future__ import annotations

import pytest

from bladeflow.core.contract import SessionConfig
from bladeflow.core.generation import DECODER_FILE
from bladeflow.tasks.benchmark import generation as gb
from tests.generation.conftest import Trained

pytestmark = pytest.mark.torch


def test_weight_bytes_count_each_weight_once(bart: Trained) -> None:
    # setup: BART ties the LM head to the shared embeddings; the cross-attention keys/values
    # are computed once per request, so their projections are not read per step
    model = bart.model
    per_step = {
        p.data_ptr(): p.numel() * 4
        for name, p in model.get_decoder().named_parameters()
        if "encoder_attn.k_proj" not in name and "encoder_attn.v_proj" not in name
    }
    # execute
    torch_bytes = gb.torch_decoder_bytes(model)
    onnx_bytes = gb.onnx_weight_bytes(bart.folder / DECODER_FILE)
    # assert: the tied head is the embedding, counted once; the export holds the same weights
    assert model.get_output_embeddings().weight.data_ptr() in per_step
    assert torch_bytes == sum(per_step.values())
    assert abs(onnx_bytes - torch_bytes) < 0.05 * torch_bytes, (onnx_bytes, torch_bytes)


def test_onnx_and_torch_breakdowns(trained: Trained) -> None:
    # setup
    settings = gb.GenerateBench(new_tokens=5, rounds=2, warmup=0, threads=1)
    feeds = gb.rows([trained.inputs], 2)
    bandwidth = 10.0  # GB/s, fixed so the bound is checkable
    # execute
    ours = gb.onnx_breakdown(trained.folder, SessionConfig(), feeds, settings, bandwidth)
    theirs = gb.torch_breakdown(trained.model, feeds, settings, bandwidth)
    report = gb.GenerationBreakdown(
        bandwidth_gb_s=bandwidth, models={"fp32": {2: ours}, "source": {2: theirs}}
    )
    # assert
    assert ours.batch_size == 2 and ours.new_tokens == 5 and ours.how == "measured per step"
    assert ours.encoder_ms > 0 and ours.first_step_ms > 0 and ours.per_token_ms > 0
    assert ours.bound_ms == pytest.approx(ours.decoder_weight_bytes / 10e9 * 1e3)
    assert theirs.encoder_ms > 0 and theirs.how.startswith("derived")
    assert report.metrics()["generation.breakdown.fp32.b2.bound_ms"] == ours.bound_ms
    table = gb.breakdown_table(report)
    assert "| fp32 | 2 |" in table and "| source | 2 |" in table


def test_bandwidth_is_measured() -> None:
    # a copy of 16 MiB: any real machine moves it at well over 0.1 GB/s and under 10 TB/s
    assert 0.1 < gb.measure_bandwidth(megabytes=16, repeats=2) < 10_000
