"""Tiny encoder-decoders built from configs and trained for seconds on a synthetic task.

Random weights give near-tied logits, so greedy/beam agreement would be luck; a few hundred steps
on "reverse the sequence" give real margins. Speech: each token becomes a block of frames of a
fixed per-token mel pattern plus noise, and the model transcribes the tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PAD, BOS, EOS = 0, 1, 2
VOCAB = 16  # tokens 3..15 carry content
SEQ = (3, 7)  # content length range


def random_sequences(rng: np.random.Generator, n: int) -> list[list[int]]:
    return [list(rng.integers(3, VOCAB, size=rng.integers(SEQ[0], SEQ[1] + 1))) for _ in range(n)]


def text_batch(seqs: list[list[int]]) -> dict[str, np.ndarray]:
    """input_ids/attention_mask, right padded, each ending with EOS."""
    width = max(len(s) for s in seqs) + 1
    ids = np.full((len(seqs), width), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s) + 1] = [*s, EOS]
        mask[i, : len(s) + 1] = 1
    return {"input_ids": ids, "attention_mask": mask}


def labels_for(seqs: list[list[int]]) -> np.ndarray:
    """Reversed content then EOS, padded with -100 (ignored by the loss)."""
    width = max(len(s) for s in seqs) + 1
    out = np.full((len(seqs), width), -100, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s) + 1] = [*reversed(s), EOS]
    return out


def tiny_bart(d_model: int = 32, layers: int = 2, max_positions: int = 64) -> Any:
    """A BART-type model; the defaults are the test size, the bench passes larger ones."""
    from transformers import BartConfig, BartForConditionalGeneration

    settings: dict[str, Any] = dict(
        vocab_size=VOCAB,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_position_embeddings=max_positions,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        attn_implementation="eager",
    )
    return BartForConditionalGeneration(BartConfig(**settings))


MEL, FRAMES_PER_TOKEN, SOURCE_POSITIONS = 8, 4, 16  # encoder input: 2 * 16 = 32 frames


def tiny_whisper(d_model: int = 32, layers: int = 2, max_target_positions: int = 32) -> Any:
    """A Whisper-type model; the defaults are the test size, the bench passes larger ones."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    settings: dict[str, Any] = dict(
        vocab_size=VOCAB,
        num_mel_bins=MEL,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=SOURCE_POSITIONS,
        max_target_positions=max_target_positions,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        attn_implementation="eager",
    )
    return WhisperForConditionalGeneration(WhisperConfig(**settings))


def speech_batch(seqs: list[list[int]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Log-mel-like features: a fixed pattern per token, FRAMES_PER_TOKEN frames each."""
    patterns = np.random.default_rng(1234).normal(size=(VOCAB, MEL)).astype(np.float32)
    frames = 2 * SOURCE_POSITIONS
    out = np.zeros((len(seqs), MEL, frames), dtype=np.float32)
    for i, s in enumerate(seqs):
        for j, tok in enumerate(s):
            out[i, :, j * FRAMES_PER_TOKEN : (j + 1) * FRAMES_PER_TOKEN] = patterns[tok][:, None]
    out += 0.05 * rng.normal(size=out.shape).astype(np.float32)
    return {"input_features": out}


def speech_labels(seqs: list[list[int]]) -> np.ndarray:
    width = max(len(s) for s in seqs) + 1
    out = np.full((len(seqs), width), -100, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s) + 1] = [*s, EOS]
    return out


def train(model: Any, speech: bool, steps: int, seed: int = 0) -> Any:
    """Adam on fresh random batches; returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    # One thread: tiny matmuls gain nothing from more, and on a shared machine extra threads
    # waiting on each other made 300 steps take minutes instead of seconds.
    torch.set_num_threads(1)
    try:
        return _train(model, speech, steps, seed, torch.optim.Adam(model.parameters(), lr=3e-3))
    finally:
        torch.set_num_threads(threads)


def _train(model: Any, speech: bool, steps: int, seed: int, opt: Any) -> Any:
    import torch

    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        seqs = random_sequences(rng, 32)
        if speech:
            inputs = speech_batch(seqs, rng)
            labels = speech_labels(seqs)
        else:
            inputs = text_batch(seqs)
            labels = labels_for(seqs)
        batch = {k: torch.from_numpy(v) for k, v in inputs.items()}
        loss = model(**batch, labels=torch.from_numpy(labels)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


WORDS = [chr(ord("a") + i) for i in range(VOCAB - 3)]  # token 3 + i is the word WORDS[i]


def texts_for(seqs: list[list[int]]) -> list[str]:
    """The sentences a word tokenizer turns into ``seqs`` (plus EOS): "d e f"."""
    return [" ".join(WORDS[int(t) - 3] for t in s) for s in seqs]


def word_tokenizer() -> Any:
    """A word-level fast tokenizer over the tiny vocabulary: one letter per content token, EOS
    appended, as :func:`text_batch` lays the inputs out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
    )


def save_text_model(model: Any, folder: Any, max_new_tokens: int = 10) -> Any:
    """``model`` as a Hugging Face folder with its tokenizer and a generation config."""
    model.generation_config.max_new_tokens = max_new_tokens
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def feature_extractor() -> Any:
    """A Whisper feature extractor of the tiny model's input size (MEL bins, 32 frames): saved
    beside the model so the folder is complete; requests send features, not audio."""
    from transformers import WhisperFeatureExtractor

    frames = 2 * SOURCE_POSITIONS
    return WhisperFeatureExtractor(
        feature_size=MEL, sampling_rate=16000, hop_length=16000 // frames, chunk_length=1
    )


def save_speech_model(model: Any, folder: Any, max_new_tokens: int = 10) -> Any:
    """The tiny Whisper-type ``model`` as a Hugging Face folder: weights, generation config,
    feature extractor and a word tokenizer (ids -> text)."""
    model.generation_config.max_new_tokens = max_new_tokens
    model.save_pretrained(folder)
    feature_extractor().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def write_features(path: Any, n: int, seed: int, labels: bool = True) -> list[list[int]]:
    """``n`` utterances as an ``.npz``: ``input_features`` (n, MEL, frames) and, with
    ``labels``, their transcripts (a string array: loads without pickle)."""
    rng = np.random.default_rng(seed)
    seqs = random_sequences(rng, n)
    features = speech_batch(seqs, rng)["input_features"]
    if labels:
        np.savez(path, input_features=features, labels=np.array(texts_for(seqs)))
    else:
        np.savez(path, input_features=features)
    return seqs
