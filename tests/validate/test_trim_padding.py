"""Tokenized text: timed at each batch's own length, as served; judged on real tokens only."""

from __future__ import annotations

import numpy as np

from bladeflow.tasks.validate.data import mask_padding, tile, trim_padding


def _texts() -> dict[str, np.ndarray]:
    # two short texts and a long one, padded (right) to the long one's 10 tokens
    mask = np.zeros((3, 10), np.int64)
    mask[0, :3], mask[1, :4], mask[2, :] = 1, 1, 1
    return {
        "input_ids": mask * 7,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(mask),
        "extra": np.ones((3, 2), np.float32),  # another shape: never cut
    }


DYNAMIC = {"input_ids", "attention_mask", "token_type_ids"}


def test_a_batch_of_short_texts_loses_the_columns_none_of_them_uses() -> None:
    # execute
    one, two, all3 = (trim_padding(tile(_texts(), n), DYNAMIC) for n in (1, 2, 3))
    # assert
    assert one["input_ids"].shape == (1, 3) and one["token_type_ids"].shape == (1, 3)
    assert two["attention_mask"].shape == (2, 4) and two["attention_mask"].sum() == 7
    assert all3["input_ids"].shape == (3, 10)  # the long text needs every column
    assert one["extra"].shape == (1, 2)


def test_fixed_length_inputs_and_left_padding_are_left_alone() -> None:
    data = tile(_texts(), 1)
    # a graph with a fixed sequence axis must get the length it was built for
    assert trim_padding(data, {"attention_mask"})["input_ids"].shape == (1, 10)
    assert trim_padding(data, set())["input_ids"].shape == (1, 10)
    # left padding (the real tokens at the end): nothing trailing to cut
    left = {k: v[:, ::-1].copy() if v.shape == (1, 10) else v for k, v in data.items()}
    assert trim_padding(left, DYNAMIC)["attention_mask"].shape == (1, 10)


def test_mask_padding_zeroes_per_token_outputs_at_padding_only():
    # setup: sample 0 has 3 real tokens, sample 1 has 1; a per-token output, a [batch, seq]
    # score and a pooled [batch, hidden] output
    data = {"attention_mask": np.array([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=np.int64)}
    values = {
        "last_hidden_state": np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3) + 1,
        "start_logits": np.ones((2, 4), dtype=np.float32),
        "pooled": np.ones((2, 4), dtype=np.float32),
    }
    # execute
    out = mask_padding(values, data)
    # assert
    hidden = out["last_hidden_state"]
    assert (hidden[0, 3] == 0).all() and (hidden[1, 1:] == 0).all()
    assert (hidden[0, :3] == values["last_hidden_state"][0, :3]).all()
    assert (hidden[1, 0] == values["last_hidden_state"][1, 0]).all()
    assert out["start_logits"] is values["start_logits"]  # 2-D: an argmax could read padding
    assert out["pooled"] is values["pooled"]
    assert values["last_hidden_state"].min() > 0  # the input is not modified


def test_gate_judges_real_tokens_not_padding():
    # setup: a candidate that is exact on real tokens and wild on the padding
    from bladeflow.core.policy import TolerancePolicy
    from bladeflow.tasks.validate.gate import judge

    rng = np.random.default_rng(0)
    data = {"attention_mask": np.array([[1, 1, 0, 0, 0, 0]] * 3, dtype=np.int64)}
    ref = {"last_hidden_state": rng.standard_normal((3, 6, 8)).astype(np.float32)}
    got = {"last_hidden_state": ref["last_hidden_state"].copy()}
    got["last_hidden_state"][:, 2:] = rng.standard_normal((3, 4, 8))
    policy = TolerancePolicy()
    # execute
    raw = judge("c", got, ref, policy)
    masked = judge("c", mask_padding(got, data), mask_padding(ref, data), policy)
    # assert
    assert not raw.passed
    assert masked.passed, masked.reason


def test_the_padding_mask_is_attention_mask_else_the_one_0_1_input_named_mask():
    # setup: TF BERT names it input_mask
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int32)
    hidden = {"h": np.ones((2, 3, 4), np.float32)}
    # execute
    tf_style = mask_padding(hidden, {"input_ids": mask * 5, "input_mask": mask})
    two = mask_padding(hidden, {"input_mask": mask, "segment_mask": mask})  # which one? neither
    not_0_1 = mask_padding(hidden, {"attention_mask": mask * 2})
    # assert
    assert tf_style["h"][:, :, 0].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert two["h"] is hidden["h"] and not_0_1["h"] is hidden["h"]
