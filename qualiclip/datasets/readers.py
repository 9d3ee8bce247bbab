"""Label-file readers (CSV, whitespace text, MATLAB .mat, Excel .xlsx, pyiqa split files) that fail
with DatasetError."""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import scipy.io

from qualiclip.datasets.base import DatasetError


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else DatasetError saying what was expected there."""
    if not path.is_file():
        raise DatasetError(f"{what} not found at {path} — check the dataset root and its layout (docs/datasets.md)")
    return path


def read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a headed CSV as dicts; DatasetError if a ``required`` column is absent."""
    with open(require_file(path, "label file"), newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(f"{path} lacks column(s) {missing}; its header is {header}")
        return [row for row in reader if any((v or "").strip() for v in row.values())]


def read_columns(path: Path, n: int) -> list[list[str]]:
    """Whitespace-separated text lines with at least ``n`` fields each (blank lines skipped)."""
    lines = require_file(path, "label file").read_text(encoding="utf-8-sig").splitlines()
    rows = [line.split() for line in lines if line.strip()]
    short = [i + 1 for i, r in enumerate(rows) if len(r) < n]
    if short:
        raise DatasetError(f"{path}: line {short[0]} has fewer than {n} fields ({len(short)} such lines)")
    return rows


def read_mat_vector(path: Path, *keys: str) -> np.ndarray:
    """The first of the variables ``keys`` present in a MATLAB (v5) file, as a 1-D array
    (cell arrays of strings become str arrays)."""
    require_file(path, "MATLAB label file")
    try:
        data = scipy.io.loadmat(path)
    except (NotImplementedError, ValueError) as exc:  # v7.3 (HDF5) or corrupt
        raise DatasetError(f"cannot read {path} as a MATLAB v5 file ({exc}) — re-save it with -v7") from None
    key = next((k for k in keys if k in data), None)
    if key is None:
        have = sorted(k for k in data if not k.startswith("__"))
        raise DatasetError(f"{path} has none of the variables {list(keys)} (it has {have})")
    values = np.asarray(data[key]).reshape(-1)
    if values.dtype == object:  # a cell array: each element is a 1-element array of str
        return np.array([str(np.asarray(v).reshape(-1)[0]) for v in values])
    return values


def read_xlsx(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of the first sheet of an .xlsx file (header in row 1), like `read_csv`.

    Needs the optional ``openpyxl`` package; without it the error says how to export a CSV.
    """
    require_file(path, "label sheet")
    try:
        import openpyxl
    except ImportError:
        raise DatasetError(
            f"reading {path} needs openpyxl (pip install openpyxl), or save the sheet "
            f"as '{path.with_suffix('.csv').name}' next to it"
        ) from None
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    rows = list(book.worksheets[0].iter_rows(values_only=True))
    book.close()
    header = [str(c).strip() if c is not None else "" for c in (rows[0] if rows else [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(f"{path} lacks column(s) {missing}; its header is {header}")
    return [
        {h: "" if v is None else str(v) for h, v in zip(header, r)} for r in rows[1:] if any(v is not None for v in r)
    ]


def to_float(value: str, where: str) -> float:
    """``float(value)`` or DatasetError naming the file/line in ``where``."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: score {value!r} is not a number") from None


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers and strings only. What makes a pickle run code is a
    global (a class or function) that it names and calls; every such lookup is refused here."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference")


def read_split_file(path: Path, index: int) -> dict[str, list[int]]:
    """Scheme ``index`` of a pyiqa split file ``{index: {phase: [row, ...]}}`` as ``{phase: rows}``.

    A ``.json`` file (keys as strings) is read as JSON; anything else as a pickle restricted to
    plain dicts, lists and ints (`_PlainUnpickler`): a pickle naming any class or function —
    numpy arrays included — is refused, never run.
    """
    data = require_file(path, "pyiqa split file").read_bytes()
    try:
        if path.suffix.lower() == ".json":
            splits = json.loads(data)
        else:
            splits = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - garbage raises anything (KeyError, TypeError, ...); nothing ran
        raise DatasetError(
            f"{path} is not a plain pyiqa split file ({exc}); only dicts/lists of ints are read — "
            're-save it as JSON: {"1": {"train": [0, ...], "val": [...], "test": [...]}}'
        ) from None
    scheme = splits.get(index, splits.get(str(index))) if isinstance(splits, dict) else None
    if scheme is None:
        raise DatasetError(f"{path} has no split index {index}")
    if not isinstance(scheme, dict) or not all(
        isinstance(rows, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
        for rows in scheme.values()
    ):
        raise DatasetError(f"{path}: split {index} must map each phase to a list of row numbers")
    return {str(phase): rows for phase, rows in scheme.items()}
