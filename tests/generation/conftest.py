"""Session fixtures: two tiny encoder-decoders, trained for seconds, exported once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.generation import tiny_models as tm


@dataclass
class Trained:
    """A trained torch model, its ONNX export folder and a batch of its inputs."""

    name: str
    model: Any
    folder: Path
    inputs: dict[str, np.ndarray]
    seqs: list[list[int]]

    def batch(self, seqs: list[list[int]], seed: int = 7) -> dict[str, np.ndarray]:
        if self.name == "whisper":
            return tm.speech_batch(seqs, np.random.default_rng(seed))
        return tm.text_batch(seqs)


def _build(name: str, root: Path) -> Trained:
    pytest.importorskip("transformers")
    import torch

    from bladeflow.tasks.convert.seq2seq_export import export

    speech = name == "whisper"
    # The initial weights come from torch's global generator, which a new process seeds at
    # random: without this, each session trained a different model, and now and then one whose
    # logits were near-tied on a test sample (greedy agreement and margin tests then failed).
    torch.manual_seed(0)
    model = tm.train(tm.tiny_whisper() if speech else tm.tiny_bart(), speech, steps=300)
    folder = root / name
    export(model, folder)
    rng = np.random.default_rng(5)
    seqs = tm.random_sequences(rng, 8)
    inputs = tm.speech_batch(seqs, rng) if speech else tm.text_batch(seqs)
    return Trained(name=name, model=model, folder=folder, inputs=inputs, seqs=seqs)


class Zoo:
    """Builds each tiny model once per session, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, Trained] = {}

    def get(self, name: str) -> Trained:
        if name not in self.built:
            self.built[name] = _build(name, self.root)
        return self.built[name]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("seq2seq"))


@pytest.fixture(scope="session", params=["bart", "whisper"])
def trained(request: pytest.FixtureRequest, zoo: Zoo) -> Trained:
    return zoo.get(str(request.param))


@pytest.fixture(scope="session")
def bart(zoo: Zoo) -> Trained:
    return zoo.get("bart")


@pytest.fixture(scope="session")
def text_folder(bart: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained BART-type model as a Hugging Face folder with its tokenizer."""
    return Path(tm.save_text_model(bart.model, tmp_path_factory.mktemp("hf") / "bart"))


@pytest.fixture(scope="session")
def speech_folder(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained Whisper-type model as a Hugging Face folder: weights, generation config,
    feature extractor and tokenizer."""
    whisper = zoo.get("whisper")
    return Path(tm.save_speech_model(whisper.model, tmp_path_factory.mktemp("hf") / "whisper"))
