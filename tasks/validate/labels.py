"""Non-numeric (string) outputs, such as the class label of a scikit-learn classifier.

ONNX ``tensor(string)`` outputs come back from ONNX Runtime as numpy object arrays of ``str``; a
source framework may give ``<U`` or object arrays. :func:`as_text` turns all of them into one
``numpy.str_`` array, which ``numpy.savez`` stores without pickling. Such outputs are compared by
equality, never by numbers: a sample agrees when every element equals the source's.
"""

from __future__ import annotations

import numpy as np

from bladeflow.core.contract import OutputAccuracy

LABEL_AGREE = "label_agree"  # the error-table measure of a label output: 1.0 equal, 0.0 not


def is_text(values: np.ndarray) -> bool:
    """Whether ``values`` holds strings (or other non-numeric objects) rather than numbers."""
    return np.asarray(values).dtype.kind in "OUS"


def as_text(values: np.ndarray) -> np.ndarray:
    """``values`` as a ``numpy.str_`` array (bytes decoded as UTF-8); numbers pass unchanged."""
    arr = np.asarray(values)
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8", errors="replace")
    if arr.dtype.kind != "O":
        return arr
    flat = [
        v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
        for v in arr.reshape(-1)
    ]
    return np.asarray(flat, dtype=np.str_).reshape(arr.shape)


def agree_rows(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """1.0 for every sample whose elements all equal the source's, else 0.0 (shape [samples])."""
    a, b = as_text(got).astype(np.str_), as_text(ref).astype(np.str_)
    n = b.shape[0] if b.ndim else 1
    if a.shape != b.shape:
        raise ValueError(f"label output has shape {a.shape}, source {b.shape}")
    equal = a.reshape(n, -1) == b.reshape(n, -1)
    return np.asarray(equal.all(axis=1), dtype=np.float64)


def label_accuracy(agree: np.ndarray) -> OutputAccuracy:
    """The contract's per-output summary for a label output, from :func:`agree_rows`.

    A label has no numeric distance: a differing sample counts as error 1 and cosine 0, an equal
    one as error 0 and cosine 1, so ``mean_cosine`` is the label agreement rate and
    ``failing_samples`` the number of samples whose label differs.
    """
    n = int(agree.size)
    ok = agree >= 1.0
    return OutputAccuracy(
        max_abs_error=float((~ok).any()) if n else 0.0,
        max_rel_error=float((~ok).any()) if n else 0.0,
        min_cosine=float(agree.min()) if n else 1.0,
        mean_cosine=float(agree.mean()) if n else 1.0,
        samples=n,
        failing_samples=int((~ok).sum()),
    )


def first_difference(got: np.ndarray, ref: np.ndarray) -> str:
    """``sample i: 'x' vs source 'y'`` for the first sample whose label differs ('' if none)."""
    a, b = as_text(got).astype(np.str_), as_text(ref).astype(np.str_)
    n = b.shape[0] if b.ndim else 1
    a2, b2 = a.reshape(n, -1), b.reshape(n, -1)
    for i in range(n):
        if not (a2[i] == b2[i]).all():
            shown_a = a2[i].tolist() if a2.shape[1] > 1 else a2[i, 0]
            shown_b = b2[i].tolist() if b2.shape[1] > 1 else b2[i, 0]
            return f"sample {i}: {shown_a!r} vs source {shown_b!r}"
    return ""
