"""Candidates that are literally the same model are timed once, as the simplest of them."""

from __future__ import annotations

from bladeflow.core.contract import (
    Candidate,
    ModelArtifact,
    PassRecord,
    Provenance,
    SessionConfig,
    Signature,
)
from bladeflow.flows.candidates import identical


def _cand(name: str, sha: str, *passes: str, threads: int = 0) -> Candidate:
    art = ModelArtifact(
        path=f"{sha}.onnx",
        format="onnx",
        sha256=sha * 64,
        size_bytes=1,
        signature=Signature(inputs=[], outputs=[]),
        provenance=Provenance(source="m.onnx"),
    )
    return Candidate(
        name=name,
        artifact=art,
        recipe=[PassRecord(name=p) for p in passes],
        session=SessionConfig(intra_op_num_threads=threads),
    )


def test_the_same_graph_and_session_is_timed_once_as_the_simplest_recipe() -> None:
    # setup: SmoothQuant chose no scaling, so its int8 is byte-for-byte the plain int8
    passing = [
        _cand("baseline", "0"),
        _cand("fused-smooth-int8-recovered", "a", "transformer_fusion", "smoothquant", "mp"),
        _cand("fused-int8-recovered", "a", "transformer_fusion", "mp"),
        _cand("fused-int8-recovered-tuned", "a", "transformer_fusion", "mp", "session", threads=2),
        _cand("fused", "b", "transformer_fusion"),
    ]
    # execute
    out = identical(passing)
    # assert: only the literal duplicate goes; other thread settings are another candidate
    assert list(out) == ["fused-smooth-int8-recovered"]
    assert "identical to fused-int8-recovered" in out["fused-smooth-int8-recovered"]
