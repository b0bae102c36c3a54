"""A benchmark batch of tokenized text is timed at its own longest text, as a server pads it."""

from __future__ import annotations

import numpy as np

from bladeflow.tasks.validate.data import tile, trim_padding


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
