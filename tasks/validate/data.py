"""Validation data: load it, check it against the model's signature, or synthesize it.

Arrays carry a leading sample axis. When the model's batch dimension is dynamic that axis is the
batch axis; when it is fixed (say 1), samples are fed in chunks of that size.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bladeflow.core.contract import Signature, TensorSpec
from bladeflow.core.errors import DataError
from bladeflow.core.text import human_bytes

Dataset = dict[str, np.ndarray]

DEFAULT_SYNTHETIC_SAMPLES = 16
DEFAULT_DYNAMIC_DIM = 16  # e.g. a sequence length: real queries are short
_INT_HIGH = 10  # synthetic integer inputs stay small: they are often indices (token ids)

ENV_MAX_DATA_BYTES = "BLADEFLOW_MAX_DATA_BYTES"
DEFAULT_MAX_DATA_BYTES = 4 << 30  # 4 GiB: validation data is loaded into memory whole


def max_data_bytes() -> int:
    """The most bytes of validation arrays bladeflow loads (``BLADEFLOW_MAX_DATA_BYTES``,
    default 4 GiB): every stage holds the data in memory, so more would exhaust it."""
    raw = os.environ.get(ENV_MAX_DATA_BYTES, "")
    try:
        return int(raw) if raw.strip() else DEFAULT_MAX_DATA_BYTES
    except ValueError:
        raise DataError(f"{ENV_MAX_DATA_BYTES}={raw!r} is not a number of bytes") from None


def check_array_files(path: str | Path) -> None:
    """Read only the headers of a ``.npz`` / ``.npy`` (or a folder of ``.npy``) and refuse, before
    anything is allocated: object arrays (pickles), arrays whose header claims more bytes than the
    file holds (truncated or crafted), and a total over :func:`max_data_bytes`. Other kinds are
    checked by their on-disk size only.

    Raises:
        DataError: with the array, what its header claims and what the file holds.
    """
    p = Path(path)
    limit = max_data_bytes()
    declared: list[tuple[str, int, int]] = []  # (name, declared bytes, stored bytes)
    try:
        if p.is_dir():
            for f in sorted(p.glob("*.npy")):
                with f.open("rb") as fh:
                    declared.append((f.name, *_npy_sizes(fh, f.stat().st_size, f.name)))
        elif p.suffix.lower() == ".npz" and p.is_file():
            with zipfile.ZipFile(p) as zf:
                for info in zf.infolist():
                    with zf.open(info) as fh:
                        sizes = _npy_sizes(fh, info.file_size, info.filename)
                        declared.append((info.filename, *sizes))
        elif p.suffix.lower() == ".npy" and p.is_file():
            with p.open("rb") as fh:
                declared.append((p.name, *_npy_sizes(fh, p.stat().st_size, p.name)))
        elif p.is_file() and p.stat().st_size > limit:
            raise DataError(
                f"validation data {p} is {human_bytes(p.stat().st_size)}, over the limit of "
                f"{human_bytes(limit)} ({ENV_MAX_DATA_BYTES}); use a smaller sample"
            )
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read validation data {p}: {exc}") from exc
    for name, want, have in declared:
        if want > have:
            raise DataError(
                f"validation data {p}: array {name} claims {want} bytes in its header but the file "
                f"holds {have}: it is truncated or corrupt; save it again with numpy.savez"
            )
    total = sum(want for _, want, _ in declared)
    if total > limit:
        raise DataError(
            f"validation data {p} declares {human_bytes(total)} of arrays, over the limit "
            f"of {human_bytes(limit)} ({ENV_MAX_DATA_BYTES}=<bytes> raises it): use a "
            "smaller validation sample"
        )


def _npy_sizes(fh: object, stored: int, name: str) -> tuple[int, int]:
    """(bytes the .npy header declares, bytes of array data the member actually stores)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)  # type: ignore[arg-type]
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = reader(fh)  # type: ignore[arg-type]
    except ValueError as exc:
        raise DataError(f"array {name} is not a readable .npy ({exc})") from exc
    if dtype.hasobject:
        raise DataError(
            f"array {name} holds Python objects (a pickle); bladeflow never unpickles data: store "
            "numeric or string arrays"
        )
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize, stored - fh.tell()  # type: ignore[attr-defined]


def load_npz(path: str | Path, signature: Signature) -> Dataset:
    """Load a ``.npz`` whose arrays are named after the model's inputs, and check it.

    Raises:
        DataError: unreadable file, or arrays that do not match the signature.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"validation data {p} does not exist")
    if p.suffix.lower() != ".npz":
        raise DataError(
            f"validation data {p} is not a .npz file; save arrays named after the model inputs "
            "with numpy.savez(path, **{name: array})"
        )
    check_array_files(p)
    try:
        with np.load(p, allow_pickle=False) as npz:
            data = {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read validation data {p}: {exc}") from exc
    return check_dataset(data, signature, origin=str(p))


def check_dataset(data: Dataset, signature: Signature, origin: str = "data") -> Dataset:
    """Check names, ranks, fixed dims, dtypes and values; return arrays cast to the model dtypes.

    Every problem found is listed in one DataError, so the user fixes them in one go.
    """
    problems: list[str] = []
    expected = {s.name for s in signature.inputs}
    missing = sorted(expected - data.keys())
    extra = sorted(data.keys() - expected)
    if missing:
        problems.append(f"missing input(s) {missing}")
    if extra:
        problems.append(f"unknown array(s) {extra} (the model has no such input)")

    out: Dataset = {}
    dynamic_sizes: dict[str, tuple[int, str]] = {}
    samples: set[int] = set()
    for spec in signature.inputs:
        if spec.name not in data:
            continue
        arr = data[spec.name]
        got = f"{arr.dtype}{list(arr.shape)}"
        where = f"input {spec.name!r} (model expects {spec.describe()}, got {got})"
        if arr.ndim != len(spec.shape):
            problems.append(f"{where}: rank {arr.ndim} != {len(spec.shape)}")
            continue
        if arr.ndim == 0:
            problems.append(f"{where}: scalar inputs need a sample axis")
            continue
        samples.add(arr.shape[0])
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(want, int) and axis > 0 and want != got:
                problems.append(f"{where}: dim {axis} is {got}, must be {want}")
            elif isinstance(want, str) and axis > 0:
                seen = dynamic_sizes.setdefault(want, (got, spec.name))
                if seen[0] != got:
                    problems.append(
                        f"{where}: dim {axis} ({want!r}) is {got} but {seen[1]!r} has {seen[0]}"
                    )
        batch = spec.shape[0]
        if isinstance(batch, int) and arr.shape[0] % batch:
            problems.append(f"{where}: {arr.shape[0]} samples is not a multiple of batch {batch}")
        cast, why = _cast(arr, spec)
        if why:
            problems.append(f"{where}: {why}")
        else:
            out[spec.name] = cast
    if len(samples) > 1:
        problems.append(f"inputs have different numbers of samples: {sorted(samples)}")
    if problems:
        raise DataError(
            f"validation data {origin} does not match the model: " + "; ".join(problems)
        )
    return out


def _cast(arr: np.ndarray, spec: TensorSpec) -> tuple[np.ndarray, str]:
    target = np.dtype(spec.dtype)
    if arr.dtype == target:
        cast = arr
    elif arr.dtype.kind in "fiub" and target.kind == "f":
        cast = arr.astype(target)
    elif arr.dtype.kind in "iub" and target.kind in "iu":
        cast = arr.astype(target)
        if not np.array_equal(cast, arr):
            return arr, f"values do not fit in {target}"
    elif arr.dtype.kind == "b" and target.kind == "b":
        cast = arr
    else:
        return arr, f"dtype {arr.dtype} cannot be used as {target}"
    if cast.dtype.kind == "f" and not np.isfinite(cast).all():
        return arr, f"{int((~np.isfinite(cast)).sum())} NaN/inf value(s)"
    return cast, ""


def synthesize(
    signature: Signature, samples: int = DEFAULT_SYNTHETIC_SAMPLES, seed: int = 0
) -> Dataset:
    """Random inputs shaped like the signature; dynamic dims of the same name get the same size."""
    rng = np.random.default_rng(seed)
    named: dict[str, int] = {}
    data: Dataset = {}
    for spec in signature.inputs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(samples * dim if axis == 0 else dim)
            elif axis == 0:
                shape.append(samples)
            elif isinstance(dim, str):
                shape.append(named.setdefault(dim, DEFAULT_DYNAMIC_DIM))
            else:
                shape.append(DEFAULT_DYNAMIC_DIM)
        dtype = np.dtype(spec.dtype)
        if spec.value_range is not None:
            low, high = spec.value_range
            if dtype.kind in "iu":
                data[spec.name] = rng.integers(int(low), int(high), shape).astype(dtype)
            else:
                data[spec.name] = rng.uniform(low, high, shape).astype(dtype)
        elif dtype.kind == "f":
            data[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            data[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif "mask" in spec.name.lower():
            data[spec.name] = np.ones(shape, dtype=dtype)
        elif "token_type" in spec.name.lower() or "segment" in spec.name.lower():
            data[spec.name] = np.zeros(shape, dtype=dtype)  # one segment: valid for any model
        elif dtype.kind in "iu":
            data[spec.name] = rng.integers(0, _INT_HIGH, shape).astype(dtype)
        else:
            raise DataError(
                f"cannot synthesize input {spec.describe()}; pass validation data with --data"
            )
    return data


def sample_count(data: Dataset) -> int:
    return int(next(iter(data.values())).shape[0]) if data else 0


def fixed_batch(signature: Signature) -> int | None:
    """The model's fixed batch size, or None when the batch dim is dynamic."""
    dims = {s.shape[0] for s in signature.inputs if s.shape}
    fixed = [d for d in dims if isinstance(d, int)]
    return fixed[0] if fixed else None


def batches(data: Dataset, size: int) -> Iterator[Dataset]:
    """Consecutive chunks of ``size`` samples (the last may be smaller)."""
    n = sample_count(data)
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in data.items()}


def trim_padding(feeds: Dataset, dynamic: set[str], mask: str = "attention_mask") -> Dataset:
    """``feeds`` without the trailing columns no sample of the batch uses (all-zero ``mask``).

    Tokenized validation data is padded to its longest text; a server pads each batch only to
    that batch's longest request. Timing one short query at the length of the longest
    paragraph would measure another workload (all-MiniLM-L6-v2: 36 ms at 129 tokens vs ~7 ms
    for a real 12-token query). Only right padding, only inputs of the mask's ``[batch, seq]``
    shape, and only when every such input's sequence axis is dynamic (``dynamic``: their names).
    """
    m = feeds.get(mask)
    if m is None or m.ndim != 2 or mask not in dynamic:
        return feeds
    used = np.flatnonzero(m.any(axis=0))
    keep = int(used[-1]) + 1 if used.size else m.shape[1]
    if keep == m.shape[1]:
        return feeds
    same = [k for k, v in feeds.items() if v.shape[:2] == m.shape]
    if any(k not in dynamic for k in same):
        return feeds
    return {k: v[:, :keep] if k in same else v for k, v in feeds.items()}


PADDING_MASK = "attention_mask"


def padding_mask(data: Dataset, preferred: str = PADDING_MASK) -> np.ndarray | None:
    """The inputs' ``[batch, seq]`` padding mask: ``preferred`` (``attention_mask``), else the one
    input named ``*mask*`` (TF BERT's ``input_mask``) that is 2-D integer/bool with only 0s and 1s.
    None when there is none, or several candidates and none is ``preferred``."""

    def is_mask(v: np.ndarray) -> bool:
        return v.ndim == 2 and v.dtype.kind in "iub" and bool(np.isin(v, (0, 1)).all())

    if preferred in data:
        return data[preferred] if is_mask(data[preferred]) else None
    found = [v for k, v in data.items() if "mask" in k.lower() and is_mask(v)]
    return found[0] if len(found) == 1 else None


def mask_padding(values: Dataset, data: Dataset, mask: str = PADDING_MASK) -> Dataset:
    """``values`` with per-token outputs zeroed where the inputs' padding mask is 0.

    The mask is ``data[mask]``, else the one 0/1 input named ``*mask*`` (:func:`padding_mask`).

    A per-token output (``[batch, seq, ...]``, 3-D or more, matching the mask's ``[batch, seq]``)
    holds numbers at padded positions that nothing downstream reads: mean pooling and token
    classification mask them out. Compared as they are, they decide a short sentence's error in
    a batch padded to 128 tokens (all-MiniLM-L6-v2, dynamic int8 on every MatMul, the 64 built-in
    texts: min cosine 0.966 over all positions, 0.985 over the real tokens). Zeroed in both
    candidate and reference, they add nothing to an error, a dot product or a norm. 2-D outputs
    (``[batch, seq]`` scores, e.g. answer-span logits, where a padded position could still win
    an argmax) are left alone.
    """
    m = padding_mask(data, mask)
    if m is None or bool(m.all()):
        return values
    out = dict(values)
    pad = m == 0
    for name, value in values.items():
        if value.ndim < 3 or value.shape[:2] != m.shape or value.dtype.kind not in "fc":
            continue
        masked = value.copy()
        masked[pad] = 0
        out[name] = masked
    return out


def tile(data: Dataset, batch_size: int) -> Dataset:
    """A batch of exactly ``batch_size`` samples, cycling through the dataset."""
    n = sample_count(data)
    idx = np.arange(batch_size) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in data.items()}
