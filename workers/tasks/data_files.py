"""Reading a job's training data from NPZ, CSV and Parquet files (``[data]``, docs/data.md).

    columns = read_columns("/data/iris.csv", features=None, label="species", key="data.train")
    columns.features      # (n, ...) float64 (or the file's float dtype), checked finite
    columns.labels        # (n,) or (n, k): integers, floats or strings as stored

A file is named by a path (absolute here: the job check resolves a relative one against the
job file) or by an object-storage URL (``s3://bucket/key``, read through
:mod:`shardstep.checkpoints.storage`). The format follows the suffix (``.npz``, ``.csv``,
``.parquet``/``.pq``) unless ``format`` names it.

- NPZ: ``features`` and ``label`` name arrays of the archive (same first dimension);
  pickled objects are refused.
- CSV: a header row names the columns; ``features`` is a list of column names (default:
  every column but the labels); cells are decimal numbers (``label`` cells may be words).
  Parsed with Python's csv module and numpy's float conversion: each cell is correctly
  rounded to float64, then to the data's dtype.
- Parquet: the same column rules, read with pyarrow (the ``parquet`` extra); a null cell,
  a list or struct column is refused.

Every failure is a :class:`DataError` naming the job-file key, the file, the column (or
array) and, for a bad cell, its row (1-based, counting data rows only).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS = ("npz", "csv", "parquet")
SUFFIXES = {".npz": "npz", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """Training data that cannot be used; the message names the key, the file and the column."""


@dataclass(frozen=True, eq=False)
class Columns:
    """The feature and label arrays of one file, one row per example."""

    features: np.ndarray
    labels: np.ndarray
    feature_names: tuple[str, ...]
    label_names: tuple[str, ...]


def file_format(location: str, given: str | None, key: str) -> str:
    if given is not None:
        if given not in FORMATS:
            raise DataError(f"{key}: format must be one of {', '.join(FORMATS)}; got {given!r}")
        return given
    suffix = os.path.splitext(location.rstrip("/"))[1].lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{key} = {location!r}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
                        f"use .npz, .csv, .parquet or .pq, or set data.format")
    return SUFFIXES[suffix]


def read_bytes(location: str, key: str) -> bytes:
    """The whole file at a path or URL."""
    from shardstep.checkpoints.storage import is_url

    if is_url(location):
        from shardstep.checkpoints.storage import ObjectMissingError
        from shardstep.checkpoints.storage import location as object_location

        try:
            return object_location(location).read_bytes()
        except ObjectMissingError as error:
            raise DataError(f"{key}: data file not found: {location}") from error
        except (OSError, ValueError) as error:
            raise DataError(f"{key}: cannot read {location}: {error}") from error
    try:
        with open(location, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(f"{key}: data file not found: {location}") from None
    except IsADirectoryError:
        raise DataError(f"{key}: {location} is a directory; name a data file") from None
    except OSError as error:
        raise DataError(f"{key}: cannot read {location}: {error.strerror or error}") from error


def read_columns(location: str, *, features: str | Sequence[str] | None, label: str | Sequence[str],
                 key: str, format: str | None = None) -> Columns:
    kind = file_format(location, format, key)
    where = f"{key} ({location})"
    data = read_bytes(location, key)
    if kind == "npz":
        return _read_npz(data, features, label, where)
    if kind == "csv":
        header, columns = _read_csv(data, where)
    else:
        header, columns = _read_parquet(data, where)
    return select_columns(header, columns, features=features, label=label, where=where)


def select_columns(header: Sequence[str], columns: Mapping[str, Any], *, features: str | Sequence[str] | None,
                   label: str | Sequence[str], where: str, first_row: int = 1) -> Columns:
    """The feature and label arrays of a table's ``columns`` (name -> cells or array, in
    ``header`` order), each cell checked; ``first_row`` numbers the table's first row in
    messages (a part of a larger table starts further on)."""
    label_names = (label,) if isinstance(label, str) else tuple(label)
    for name in label_names:
        if name not in header:
            raise DataError(f"{where}: no label column {name!r}; its columns: {_listed(header)}")
    if features is None:
        feature_names = tuple(name for name in header if name not in label_names)
        if not feature_names:
            raise DataError(f"{where}: no feature columns besides the labels {list(label_names)}")
    else:
        feature_names = (features,) if isinstance(features, str) else tuple(features)
        for name in feature_names:
            if name not in header:
                raise DataError(f"{where}: no feature column {name!r}; its columns: {_listed(header)}")
            if name in label_names:
                raise DataError(f"{where}: column {name!r} is both a feature and a label")
    if not columns or len(columns[header[0]]) == 0:
        raise DataError(f"{where}: the file holds no rows")
    inputs = np.stack([_numbers(columns[name], name, where, first_row) for name in feature_names], axis=1)
    targets = [_labels(columns[name], name, where, first_row) for name in label_names]
    labels = targets[0] if isinstance(label, str) else np.stack(targets, axis=1)
    return Columns(inputs, labels, feature_names, label_names)


def check_schema(location: str, kind: str, *, features: str | Sequence[str] | None, label: str | Sequence[str],
                 key: str) -> None:
    """The columns of a Parquet or CSV file, directory or glob, checked without reading its
    rows (Ray Data reads those on the cluster): the labels and features exist, and no
    feature column is of a type that cannot hold numbers."""
    try:
        import pyarrow as pa
        import pyarrow.dataset as arrow_dataset
    except ImportError:
        raise DataError(f"{key}: Ray Data's readers need pyarrow: pip install 'shardstep[parquet]'") from None
    where = f"{key} ({location})"
    try:
        schema = arrow_dataset.dataset(location, format=kind).schema
    except FileNotFoundError:
        raise DataError(f"{key}: data not found: {location}") from None
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DataError(f"{where}: cannot read its columns: {str(error).strip().splitlines()[0]}") from error
    header = list(schema.names)
    label_names = (label,) if isinstance(label, str) else tuple(label)
    for name in label_names:
        if name not in header:
            raise DataError(f"{where}: no label column {name!r}; its columns: {_listed(header)}")
    feature_names = ([name for name in header if name not in label_names] if features is None
                     else [features] if isinstance(features, str) else list(features))
    for name in feature_names:
        if name not in header:
            raise DataError(f"{where}: no feature column {name!r}; its columns: {_listed(header)}")
        kind_of = schema.field(name).type
        if not (pa.types.is_integer(kind_of) or pa.types.is_floating(kind_of) or pa.types.is_boolean(kind_of)):
            raise DataError(f"{where}: feature column {name!r} is of type {kind_of}; feature columns hold numbers")
    if not feature_names:
        raise DataError(f"{where}: no feature columns besides the labels {list(label_names)}")


def _listed(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _read_npz(data: bytes, features: Any, label: Any, where: str) -> Columns:
    if not isinstance(features, str) or not isinstance(label, str):
        raise DataError(f"{where}: in an NPZ file, data.features and data.label each name one array; got "
                        f"features = {features!r}, label = {label!r}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            names = list(archive.files)
            missing = [name for name in (features, label) if name not in names]
            if missing:
                raise DataError(f"{where}: no array {missing[0]!r}; its arrays: {_listed(names)}")
            inputs, labels = archive[features], archive[label]
    except DataError:
        raise
    except ValueError as error:  # an object array (needs pickle) or a damaged archive
        raise DataError(f"{where}: cannot read the NPZ archive: {error}") from error
    except (OSError, EOFError, KeyError) as error:
        raise DataError(f"{where}: not a readable NPZ archive ({type(error).__name__}: {error})") from error
    if inputs.ndim < 2:
        raise DataError(f"{where}: features array {features!r} must have one row per example and at least one "
                        f"feature (2 or more dimensions); got shape {inputs.shape}")
    if labels.ndim < 1 or labels.shape[0] != inputs.shape[0]:
        raise DataError(f"{where}: label array {label!r} has shape {labels.shape}, features array {features!r} "
                        f"{inputs.shape}: they need the same number of rows")
    if inputs.shape[0] == 0:
        raise DataError(f"{where}: the file holds no rows")
    if inputs.dtype.kind not in "biuf":
        raise DataError(f"{where}: features array {features!r} must be numeric; got dtype {inputs.dtype}")
    _finite(inputs, features, where)
    if labels.dtype.kind == "f":
        _finite(labels, label, where)
    elif labels.dtype.kind not in "biuU":
        raise DataError(f"{where}: label array {label!r} must hold numbers or class names; got dtype {labels.dtype}")
    return Columns(inputs, labels, (features,), (label,))


def _finite(array: np.ndarray, name: str, where: str, first_row: int = 1) -> None:
    if array.dtype.kind != "f":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        value = array.reshape(array.shape[0], -1)[row][bad.reshape(array.shape[0], -1)[row]][0]
        raise DataError(f"{where}: {name!r} holds {value} at row {row + first_row}; data must be finite numbers")


def _read_csv(data: bytes, where: str) -> tuple[list[str], dict[str, list[str]]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: a CSV file must be UTF-8 text; byte {error.start} is not") from error
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows)
    except StopIteration:
        raise DataError(f"{where}: the file is empty; a CSV file needs a header row naming its columns") from None
    except csv.Error as error:
        raise DataError(f"{where}: line 1 is not CSV: {error}") from error
    header = [name.strip() for name in header]
    if not header or any(not name for name in header):
        raise DataError(f"{where}: the header row must name every column; got {header!r}")
    duplicate = next((name for name in header if header.count(name) > 1), None)
    if duplicate is not None:
        raise DataError(f"{where}: the header names column {duplicate!r} twice")
    columns: dict[str, list[str]] = {name: [] for name in header}
    lists = list(columns.values())
    try:
        for number, row in enumerate(rows, start=2):
            if not row:
                continue  # a blank line (the csv module gives [])
            if len(row) != len(header):
                raise DataError(f"{where}: line {number} has {len(row)} cells; the header has {len(header)}")
            for cells, cell in zip(lists, row):
                cells.append(cell.strip())
    except csv.Error as error:
        raise DataError(f"{where}: line {rows.line_num} is not CSV: {error}") from error
    return header, columns


def _read_parquet(data: bytes, where: str) -> tuple[list[str], dict[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{where}: reading Parquet needs pyarrow: pip install 'shardstep[parquet]'") from None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{where}: not a readable Parquet file: {error}") from error
    return table_columns(table, where)


def table_columns(table: Any, where: str, first_row: int = 1) -> tuple[list[str], dict[str, Any]]:
    """The header and the columns (numpy arrays) of a pyarrow Table; a null cell, a list or
    a struct column is refused."""
    import pyarrow as pa

    header = list(table.column_names)
    columns = {}
    for name in header:
        column = table.column(name)
        if column.null_count:
            row = next(i for i, value in enumerate(column.is_null().to_pylist()) if value) + first_row
            raise DataError(f"{where}: column {name!r} has an empty (null) cell at row {row}")
        if pa.types.is_nested(column.type):
            raise DataError(f"{where}: column {name!r} is of type {column.type}; data columns hold single numbers "
                            f"or class names")
        columns[name] = column.to_numpy()
    return header, columns


def _numbers(cells: Any, name: str, where: str, first_row: int = 1) -> np.ndarray:
    """A feature column as float64 (or its own float dtype), every cell a finite number."""
    if isinstance(cells, np.ndarray) and cells.dtype.kind in "biuf":
        values = cells if cells.dtype.kind == "f" else cells.astype(np.float64)
    else:
        try:
            values = np.array(cells, dtype=np.float64)
        except ValueError:
            row, cell = next((i + first_row, c) for i, c in enumerate(cells) if not _is_number(c))
            shown = "an empty cell" if cell in ("", None) else f"{cell!r}"
            raise DataError(f"{where}: column {name!r} holds {shown} at row {row}; feature columns hold "
                            f"numbers") from None
    _finite(values, name, where, first_row)
    return values


def _labels(cells: Any, name: str, where: str, first_row: int = 1) -> np.ndarray:
    """A label column: int64 when every cell is an integer, float64 when every cell is a
    number, else the cells as strings (class names)."""
    if isinstance(cells, np.ndarray) and cells.dtype.kind in "biu":
        return cells.astype(np.int64)
    if isinstance(cells, np.ndarray) and cells.dtype.kind == "f":
        _finite(cells, name, where, first_row)
        return cells
    cells = [str(cell) for cell in cells]
    empty = next((i + first_row for i, cell in enumerate(cells) if cell == ""), None)
    if empty is not None:
        raise DataError(f"{where}: column {name!r} has an empty cell at row {empty}")
    try:
        return np.array([int(cell) for cell in cells], dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    if all(_is_number(cell) for cell in cells):
        values = np.array(cells, dtype=np.float64)
        _finite(values, name, where, first_row)
        return values
    return np.array(cells, dtype=str)


def _is_number(cell: Any) -> bool:
    try:
        float(cell)
    except (TypeError, ValueError):
        return False
    return cell not in ("", None)
