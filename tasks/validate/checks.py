"""Check validation data with a Great Expectations suite before any model sees it.

The arrays are profiled into a table with one row per sample: for every array ``x`` the columns
``x`` (the sample's shape, e.g. ``"16"`` or ``"3x224x224"``), ``x.dtype``, ``x.nonfinite``,
``x.min`` and ``x.max``, plus ``labels`` when given. Expectations built from the signature and a
:class:`DataPolicy` run on that table: names, dtypes, shapes, no NaN/inf, value ranges (token ids
within ``[0, vocab)``), enough rows. A failure raises :class:`DataError` naming each failed
expectation, so nothing reaches ONNX Runtime that would crash inside it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bladeflow.core.contract import Signature, TensorSpec
from bladeflow.core.errors import DataError
from bladeflow.core.policy import DataPolicy
from bladeflow.tasks.validate.data import Dataset, check_dataset
from bladeflow.tasks.validate.gx import Check, SuiteResult, run_checks

if TYPE_CHECKING:
    import pandas as pd

LABELS = "labels"
_FLOATS = ["float16", "float32", "float64"]
_INTS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"]


def profile(data: Dataset, labels: np.ndarray | None = None) -> pd.DataFrame:
    """One row per sample with the shape, dtype, NaN/inf count, min and max of every array.

    Arrays with fewer samples than the longest leave empty cells (caught as missing values).
    """
    import pandas as pd

    rows = max([_rows(a) for a in data.values()] + [len(labels) if labels is not None else 0])
    columns: dict[str, object] = {}
    for name, arr in data.items():
        n = _rows(arr)
        shape = "x".join(str(d) for d in arr.shape[1:]) if arr.ndim else "scalar"
        nonfinite, low, high = _sample_stats(arr.reshape(n, -1) if arr.ndim else arr.reshape(1, 1))
        columns[name] = _pad([shape] * n, rows)
        columns[f"{name}.dtype"] = _pad([str(arr.dtype)] * n, rows)
        columns[f"{name}.nonfinite"] = _pad(list(nonfinite.astype(float)), rows)
        columns[f"{name}.min"] = _pad(list(low), rows)
        columns[f"{name}.max"] = _pad(list(high), rows)
    if labels is not None:
        columns[LABELS] = _pad(list(np.asarray(labels).reshape(len(labels), -1)[:, 0]), rows)
    return pd.DataFrame(columns)


def _sample_stats(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row NaN/inf count, min and max of finite values; chunked to bound the float64 copy."""
    n = flat.shape[0]
    nonfinite, low, high = np.zeros(n), np.full(n, np.nan), np.full(n, np.nan)
    if flat.dtype.kind not in "fiub" or flat.shape[1] == 0:
        return nonfinite, low, high
    step = max(1, 2**24 // max(1, flat.shape[1]))  # ~128 MiB of float64 per chunk
    for start in range(0, n, step):
        values = flat[start : start + step].astype(np.float64)
        finite = np.isfinite(values)
        nonfinite[start : start + step] = (~finite).sum(axis=1)
        some = finite.any(axis=1)
        low[start : start + step] = np.where(
            some, np.where(finite, values, np.inf).min(axis=1), np.nan
        )
        high[start : start + step] = np.where(
            some, np.where(finite, values, -np.inf).max(axis=1), np.nan
        )
    return nonfinite, low, high


def data_checks(
    data: Dataset, signature: Signature, policy: DataPolicy, labels: np.ndarray | None = None
) -> list[Check]:
    """Expectations on the :func:`profile` table derived from the signature and ``policy``."""
    expected = [s.name for s in signature.inputs]
    checks = [
        Check(
            f"arrays are exactly the model inputs {expected} (got {sorted(data)})",
            "ExpectTableColumnsToMatchSet",
            {"column_set": _profile_columns(expected, labels is not None), "exact_match": True},
        ),
        Check(
            f"at least {policy.min_rows} samples",
            "ExpectTableRowCountToBeBetween",
            {"min_value": policy.min_rows},
        ),
    ]
    for spec in signature.inputs:
        name = spec.name
        checks.append(Check(f"input {name!r} is present", "ExpectColumnToExist", {"column": name}))
        if name not in data:
            continue
        checks += [
            Check(
                f"{name}: one value per sample (same sample count as the other inputs)",
                "ExpectColumnValuesToNotBeNull",
                {"column": name},
            ),
            Check(
                f"{name}: dtype usable as {spec.dtype}",
                "ExpectColumnValuesToBeInSet",
                {"column": f"{name}.dtype", "value_set": _allowed_dtypes(spec)},
            ),
            Check(
                f"{name}: sample shape {_dims(spec)}",
                "ExpectColumnValuesToMatchRegex",
                {"column": name, "regex": _shape_regex(spec)},
            ),
        ]
        if np.dtype(spec.dtype).kind == "f":
            checks.append(
                Check(
                    f"{name}: no NaN/inf",
                    "ExpectColumnValuesToBeBetween",
                    {"column": f"{name}.nonfinite", "max_value": 0},
                )
            )
        checks += _range_checks(spec, policy)
    checks += _shared_dim_checks(signature, data)
    if labels is not None:
        checks.append(
            Check(
                "labels: one per sample, none missing",
                "ExpectColumnValuesToNotBeNull",
                {"column": LABELS},
            )
        )
    return checks


def check_data(
    data: Dataset,
    signature: Signature,
    policy: DataPolicy | None = None,
    labels: np.ndarray | None = None,
    origin: str = "data",
    gx_path: Path | None = None,
) -> tuple[Dataset, SuiteResult]:
    """Run the GX data suite, then cast to the model dtypes with :func:`check_dataset`.

    Returns:
        The arrays cast to the model's dtypes, and the suite's result (saved to ``gx_path``).

    Raises:
        DataError: failed expectations, each by name, with what was observed.
    """
    policy = policy or DataPolicy()
    suite = run_checks(
        profile(data, labels), data_checks(data, signature, policy, labels), "validation-data"
    )
    if gx_path is not None:
        suite.save(gx_path)
    if not suite.success:
        try:
            check_dataset(data, signature, origin=origin)
            details = ""
        except DataError as exc:
            details = f" Details: {exc}"
        saved = f" (Great Expectations result: {gx_path})" if gx_path else ""
        raise DataError(
            f"validation data {origin} failed {len(suite.failed)} check(s): "
            f"{suite.failed_names()}.{details}{saved}"
        )
    return check_dataset(data, signature, origin=origin), suite


def _range_checks(spec: TensorSpec, policy: DataPolicy) -> list[Check]:
    name = spec.name
    if name in policy.value_ranges:
        low, high = policy.value_ranges[name]
        strict, shown = False, f"[{low:g}, {high:g}]"
    elif spec.value_range is not None:
        low, high = spec.value_range
        # [low, high) as the contract says: token ids must stay below the vocabulary size.
        strict, shown = True, f"[{low:g}, {high:g})"
    else:
        return []
    what = "token ids" if "id" in name.lower() else "values"
    return [
        Check(
            f"{name}: {what} >= {low:g} (range {shown})",
            "ExpectColumnValuesToBeBetween",
            {"column": f"{name}.min", "min_value": low},
        ),
        Check(
            f"{name}: {what} {'<' if strict else '<='} {high:g} (range {shown})",
            "ExpectColumnValuesToBeBetween",
            {"column": f"{name}.max", "max_value": high, "strict_max": strict},
        ),
    ]


def _shared_dim_checks(signature: Signature, data: Dataset) -> list[Check]:
    """Inputs declared with the same dims (e.g. input_ids and attention_mask) must agree."""
    checks = []
    seen: dict[tuple[str, ...], str] = {}
    for spec in signature.inputs:
        key = tuple(str(d) for d in spec.shape[1:])
        if spec.name not in data or not any(isinstance(d, str) for d in spec.shape[1:]):
            continue
        if key in seen:
            checks.append(
                Check(
                    f"{spec.name}: same shape as {seen[key]} in every sample "
                    f"(shared dims {list(key)})",
                    "ExpectColumnPairValuesToBeEqual",
                    {"column_A": seen[key], "column_B": spec.name},
                )
            )
        else:
            seen[key] = spec.name
    return checks


def _profile_columns(names: list[str], labels: bool) -> list[str]:
    cols = [
        f"{n}{suffix}" for n in names for suffix in ("", ".dtype", ".nonfinite", ".min", ".max")
    ]
    return [*cols, LABELS] if labels else cols


def _allowed_dtypes(spec: TensorSpec) -> list[str]:
    kind = np.dtype(spec.dtype).kind
    if kind == "f":
        return _FLOATS + _INTS
    if kind in "iu":
        return _INTS
    return [spec.dtype]


def _shape_regex(spec: TensorSpec) -> str:
    dims = [str(d) if isinstance(d, int) else r"\d+" for d in spec.shape[1:]]
    return "^" + (re.escape("x").join(dims) if dims else "") + "$"


def _dims(spec: TensorSpec) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in spec.shape[1:]) + "]"


def _rows(arr: np.ndarray) -> int:
    return int(arr.shape[0]) if arr.ndim else 1


def _pad(values: list[object], rows: int) -> list[object]:
    return values + [None] * (rows - len(values))
