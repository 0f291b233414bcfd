"""Reading raw rows from JSON/JSONL, CSV, Parquet files, dataset folders or the hub, with their row numbers."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Iterator

import datasets
import pyarrow.parquet as pq

from drdo_lightning.errors import DataError, MissingPathError
from drdo_lightning.jsonl import read_jsonl

log = logging.getLogger(__name__)

def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, row  # the line the record ends on (quoted fields may span lines)


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())  # a batch at a time
    yield from enumerate(rows, start=1)


def _read_dataset(ds: datasets.Dataset) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(ds, start=1):
        yield i, row


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, row)`` from a local file/directory or a hub dataset id.

    Local files: ``.jsonl``, ``.json`` (a list of objects), ``.csv``, ``.parquet``; a
    directory written by ``datasets.save_to_disk``. Anything else that does not exist
    locally is treated as a hub dataset id and loaded with ``datasets.load_dataset``.
    ``row_number`` is the line number for JSONL/CSV and the 1-based record index otherwise.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        return _read_dataset(loaded)
    readers = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix in readers:
        if not path.is_file():
            raise MissingPathError(f"data file not found: {path}", path=path)
        return readers[path.suffix](path)
    if path.suffix or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise MissingPathError(
            f"data source not found: {source} (expected an existing .jsonl/.json/.csv/.parquet file, "
            "a save_to_disk directory, or a hub dataset id 'owner/name')"
        )
    return _read_dataset(datasets.load_dataset(source, split=split))
