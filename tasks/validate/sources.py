"""Read validation data in the formats people have: .npz, .parquet, .csv, .jsonl, a folder of .npy.

Tables have one row per sample and a column per model input. A cell holds a number (rank-1
inputs) or a list (``[1, 2, 3]``; in a CSV as JSON text). A single 2-D input may instead be
spread over one numeric column per feature. Text columns are tokenized with the model's own
tokenizer (the artifact's ``assets["tokenizer"]`` folder); two text columns make a pair for a
two-text matching model. An optional label column is returned separately.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bladeflow.core.contract import Signature
from bladeflow.core.errors import DataError
from bladeflow.tasks.validate.data import Dataset, check_array_files

if TYPE_CHECKING:
    import pandas as pd

TABLE_SUFFIXES = {".parquet", ".pq", ".csv", ".jsonl", ".ndjson"}
LABEL_COLUMNS = ("label", "labels")


@dataclass
class LoadedData:
    """Arrays by input name as read (not yet cast or checked), labels if any, and the origin."""

    arrays: Dataset
    labels: np.ndarray | None
    origin: str


def load_data(
    path: str | Path,
    signature: Signature,
    tokenizer: str | Path | None = None,
    label_column: str | None = None,
    text_columns: list[str] | None = None,
) -> LoadedData:
    """Read ``path`` (.npz, .parquet, .csv, .jsonl or a folder of .npy) into arrays by input name.

    Args:
        path: the data file or folder.
        signature: the model's signature (input names, ranks, fixed sequence lengths).
        tokenizer: the model's tokenizer folder, needed when the table holds text.
        label_column: column (or array) of labels; default ``label``/``labels`` when present.
        text_columns: columns to tokenize (one, or two for a text pair); default: every text
            column that is neither an input nor the labels.

    Raises:
        DataError: the file is missing, unreadable, of an unknown kind, or its columns cannot be
            turned into the model's inputs.
    """
    p = Path(path)
    check_array_files(p)  # headers and sizes first: nothing huge or truncated gets allocated
    if p.is_dir():
        arrays = _read_npy_folder(p)
        return _split_labels(arrays, signature, label_column, str(p))
    if not p.is_file():
        raise DataError(f"validation data {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as npz:
                arrays = {k: np.asarray(npz[k]) for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read validation data {p}: {exc}") from exc
        return _split_labels(arrays, signature, label_column, str(p))
    if suffix in TABLE_SUFFIXES:
        frame = read_table(p)
        return table_to_arrays(frame, signature, tokenizer, label_column, text_columns, str(p))
    raise DataError(
        f"validation data {p} has an unknown kind {suffix or '(no suffix)'!r}: use .npz (arrays "
        "named after the model inputs), .parquet, .csv or .jsonl (a column per input, or text "
        "columns for a text model), or a folder of <input>.npy files"
    )


def read_table(path: Path) -> pd.DataFrame:
    """A .parquet / .csv / .jsonl file as a DataFrame."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path)
        return pd.read_json(path, lines=True)
    except (OSError, ValueError, ImportError) as exc:  # ArrowInvalid, ParserError are ValueErrors
        raise DataError(f"cannot read validation data {path}: {exc}") from exc


def table_to_arrays(
    frame: pd.DataFrame,
    signature: Signature,
    tokenizer: str | Path | None = None,
    label_column: str | None = None,
    text_columns: list[str] | None = None,
    origin: str = "table",
) -> LoadedData:
    """Turn a table (one row per sample) into arrays by input name; see :func:`load_data`."""
    inputs = [s.name for s in signature.inputs]
    label = _label_name(list(frame.columns), inputs, label_column, origin)
    labels = frame[label].to_numpy() if label else None
    rest = [c for c in frame.columns if c != label]
    if text_columns is None:
        text_columns = [c for c in rest if c not in inputs and _is_text(frame[c])]
    arrays: Dataset = {}
    if text_columns:
        missing = [c for c in text_columns if c not in frame.columns]
        if missing or len(text_columns) > 2:
            raise DataError(
                f"validation data {origin}: text columns {text_columns} cannot be used (missing "
                f"{missing}; at most two: a text and its pair)"
            )
        arrays.update(tokenize(frame, text_columns, signature, tokenizer, origin))
    for col in rest:
        if col in text_columns or col in arrays:
            continue
        if col in inputs:
            arrays[col] = _column_array(frame[col], col, origin)
    unused = [c for c in rest if c not in arrays and c not in text_columns]
    missing_inputs = [s for s in signature.inputs if s.name not in arrays]
    # One 2-D input spread over one numeric column per feature (a plain tabular file).
    if len(missing_inputs) == 1 and len(missing_inputs[0].shape) == 2 and unused:
        spec = missing_inputs[0]
        width = spec.shape[1]
        numeric = [c for c in unused if frame[c].dtype.kind in "fiub"]
        if numeric == unused and (not isinstance(width, int) or width == len(numeric)):
            arrays[spec.name] = frame[numeric].to_numpy()
            unused = []
    for col in unused:
        arrays[col] = _column_array(frame[col], col, origin)  # reported as unknown by the checks
    return LoadedData(arrays=arrays, labels=labels, origin=origin)


def tokenize(
    frame: pd.DataFrame,
    text_columns: list[str],
    signature: Signature,
    tokenizer: str | Path | None,
    origin: str = "table",
) -> Dataset:
    """Tokenize one text column (or a pair) with the model's tokenizer into its id inputs.

    Pads to the model's fixed sequence length when it has one, else to the longest row.
    """
    if tokenizer is None:
        raise DataError(
            f"validation data {origin} has text column(s) {text_columns} but the model has no "
            "tokenizer asset; give token ids as columns named after the inputs "
            f"({[s.name for s in signature.inputs]}) instead"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise DataError(
            "tokenizing text needs transformers: pip install 'bladeflow[torch]'"
        ) from exc
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load the model's tokenizer from {tokenizer}: {exc}") from exc
    names = {s.name for s in signature.inputs}
    fixed = [
        s.shape[1] for s in signature.inputs if len(s.shape) == 2 and isinstance(s.shape[1], int)
    ]
    first = frame[text_columns[0]].astype(str).tolist()
    pair = frame[text_columns[1]].astype(str).tolist() if len(text_columns) == 2 else None
    if fixed:
        kw: dict[str, Any] = {"padding": "max_length", "max_length": fixed[0]}
    else:
        limit = tok.model_max_length if 0 < tok.model_max_length <= 8192 else 512
        kw = {"padding": "longest", "max_length": limit}
    enc = tok(first, pair, truncation=True, return_tensors="np", **kw)
    return {k: np.asarray(v) for k, v in enc.items() if k in names}


def _read_npy_folder(folder: Path) -> Dataset:
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise DataError(f"validation data folder {folder} holds no .npy files (<input>.npy)")
    arrays: Dataset = {}
    for f in files:
        try:
            arrays[f.stem] = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read validation data {f}: {exc}") from exc
    return arrays


def _split_labels(
    arrays: Dataset, signature: Signature, label_column: str | None, origin: str
) -> LoadedData:
    inputs = [s.name for s in signature.inputs]
    label = _label_name(list(arrays), inputs, label_column, origin)
    labels = arrays.pop(label) if label else None
    return LoadedData(arrays=arrays, labels=labels, origin=origin)


def _label_name(
    columns: list[Any], inputs: list[str], label_column: str | None, origin: str
) -> str | None:
    if label_column is not None:
        if label_column not in columns:
            raise DataError(
                f"validation data {origin} has no label column {label_column!r}; it has "
                f"{[str(c) for c in columns]}"
            )
        return label_column
    return next((c for c in LABEL_COLUMNS if c in columns and c not in inputs), None)


def _is_text(col: pd.Series) -> bool:
    if col.dtype.kind not in "OSU" and str(col.dtype) not in {"string", "str"}:
        return False
    first = col.dropna().head(1).tolist()
    return bool(first) and isinstance(first[0], str) and not first[0].lstrip().startswith("[")


def _column_array(col: pd.Series, name: str, origin: str) -> np.ndarray:
    """A column of numbers -> [n]; a column of lists (or JSON lists in text) -> [n, ...]."""
    if col.dtype.kind in "fiub":
        return col.to_numpy()
    cells = [json.loads(c) if isinstance(c, str) and c.lstrip().startswith("[") else c for c in col]
    try:
        return np.stack([np.asarray(c) for c in cells])
    except ValueError as exc:
        raise DataError(
            f"validation data {origin}: column {name!r} has rows of different shapes ({exc}); "
            "every row of an input must have the same shape (pad token ids and masks)"
        ) from exc
