"""Reading raw rows, with their row numbers, from JSON/JSONL, CSV, Parquet files (the text ones
possibly compressed), folders of them as downloaded from a hub, globs, ``save_to_disk`` folders or the hub."""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import json
import logging
import lzma
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import datasets
import pyarrow.parquet as pq
from datasets.data_files import EmptyDatasetError, get_data_patterns, resolve_pattern

from drdo_lightning.errors import DataError, MissingPathError, shipped_made_by
from drdo_lightning.jsonl import parse_lines

log = logging.getLogger(__name__)

COMPRESSIONS: dict[str, Callable] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
FILE_TYPES = ".jsonl, .json, .csv and .parquet files (the first three also compressed as .gz, .bz2 or .xz)"


class RowNumber(int):
    """A row number that names its file, for sources of several files: ``3 in data/train-00001-of-00002.parquet``.

    It is the number everywhere a number is used; only its text names the file, so the callers'
    ``f"{source}: row {number}"`` messages point at the file and row to fix.
    """

    def __new__(cls, number: int, file: str) -> RowNumber:
        self = super().__new__(cls, number)
        self.file = file
        return self

    def __str__(self) -> str:
        return f"{int(self)} in {self.file}"

    def __reduce__(self):
        return RowNumber, (int(self), self.file)


def _file_type(path: Path) -> tuple[str | None, str | None]:
    """``(format, compression)`` from a file name, in any case: ``('jsonl', '.gz')`` for
    ``x.JSONL.gz``; format None for a file not read here."""
    suffix = path.suffix.lower()
    compression = suffix if suffix in COMPRESSIONS else None
    if compression:
        suffix = Path(path.stem).suffix.lower()
    fmt = suffix[1:]
    if fmt in ("jsonl", "json", "csv") or (fmt == "parquet" and compression is None):
        return fmt, compression
    return None, None


def _lines(path: Path, compression: str | None) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` of a UTF-8 text file, line ends kept, without the byte-order
    mark that spreadsheet programs write first; a byte that is not UTF-8 is a :class:`DataError`."""
    opener = COMPRESSIONS[compression] if compression else open
    try:
        with opener(path, "rb") as f:
            # Decoding line by line: a bad byte is reported with its line. A UTF-8 character never
            # contains the byte b"\n", so splitting before decoding cuts no character in two.
            for number, raw in enumerate(f, start=1):
                if number == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}: line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                        "of the line; perhaps Latin-1 or Windows-1252): re-save it as UTF-8"
                    ) from None
    except (OSError, EOFError, lzma.LZMAError) as e:
        if compression is None:
            raise
        raise DataError(f"{path}: not a readable {compression} file ({e})") from None


def _read_jsonl(path: Path, compression: str | None) -> Iterator[tuple[int, dict | DataError]]:
    """JSON Lines: one object per line, numbered by line; a malformed line comes as its
    :class:`DataError` (:func:`read_rows` raises it or hands it on)."""
    return parse_lines(path, _lines(path, compression), keep_malformed=True)


def _read_json(path: Path, compression: str | None) -> Iterator[tuple[int, dict]]:
    """A JSON list of objects, numbered from 1; or JSON Lines under a ``.json`` name (what
    ``Dataset.to_json`` writes), numbered by line."""
    text = "".join(line for _, line in _lines(path, compression))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A first object followed by more: JSON Lines. Read per line, so a bad line is named as such.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from parse_lines(path, enumerate(text.split("\n"), start=1), keep_malformed=True)
            return
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _read_csv(path: Path, compression: str | None) -> Iterator[tuple[int, dict]]:
    """CSV with a header row, each record numbered by the line it ends on (quoted fields may span lines)."""
    reader = csv.DictReader(line for _, line in _lines(path, compression))
    for row in reader:
        yield reader.line_num, row


def _read_parquet(path: Path, compression: str | None = None) -> Iterator[tuple[int, dict]]:
    """Parquet, a batch at a time, numbered from 1."""
    rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())
    yield from enumerate(rows, start=1)


def _read_dataset(ds: datasets.Dataset) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(ds, start=1):
        yield i, row


READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def _read_file(path: Path) -> Iterator[tuple[int, dict]]:
    """The rows of one data file (checked now, read when iterated)."""
    fmt, compression = _file_type(path)
    if fmt is None:
        raise DataError(f"{path}: not a file type read here (it reads {FILE_TYPES})")
    if not path.is_file():
        raise MissingPathError(f"data file not found: {path}", path=path, made_by=shipped_made_by(path))
    return READERS[fmt](path, compression)


def _read_files(files: list[tuple[Path, str]]) -> Iterator[tuple[RowNumber, dict]]:
    """The rows of ``(path, name shown)`` files one after another, each number naming its file."""
    readers = [(_read_file(path), shown) for path, shown in files]  # every file checked before any is read
    return ((RowNumber(number, shown), row) for rows, shown in readers for number, row in rows)


def _data_files(paths: Iterable[str]) -> list[Path]:
    """The paths of file types read here, sorted."""
    return sorted(Path(p) for p in paths if _file_type(Path(p))[0] is not None)


def _glob(pattern: str) -> list[tuple[Path, str]]:
    """The data files a glob matches, sorted, resolved as ``datasets`` resolves ``data_files``
    (hidden files and README.md left out)."""
    try:
        files = _data_files(resolve_pattern(pattern, base_path=os.getcwd()))
    except FileNotFoundError:
        files = []
    if not files:
        raise MissingPathError(f"{pattern}: no data files match (it reads {FILE_TYPES})", path=pattern,
                               made_by=shipped_made_by(pattern))
    return [(f, str(f) if os.path.isabs(pattern) else os.path.relpath(f)) for f in files]


def _listed_files(sources: list[str]) -> list[tuple[Path, str]]:
    """Files named one by one or by globs, in the order given."""
    return [f for s in sources for f in (_glob(s) if glob.has_magic(s) else [(Path(s).expanduser(), s)])]


def _split_files(folder: Path) -> dict[str, list[Path]]:
    """A folder's data files by split, assigned as ``datasets.load_dataset`` assigns them
    (``data/train-00000-of-00002.parquet`` or ``train.jsonl`` to ``train``; every file to
    ``train`` when none names a split), each split's files sorted."""
    try:
        patterns = get_data_patterns(str(folder))
    except EmptyDatasetError:
        return {}
    splits = {}
    for split, split_patterns in patterns.items():
        matched = set()
        for pattern in split_patterns:
            try:
                matched.update(resolve_pattern(pattern, base_path=str(folder)))
            except FileNotFoundError:  # a split's other spellings (training*, dev*) usually match nothing
                continue
        if files := _data_files(matched):
            splits[str(split)] = files
    return splits


def _read_folder(path: Path, split: str) -> Iterator[tuple[int, dict]]:
    """A ``save_to_disk`` folder, or a folder of data files as downloaded from a hub: ``split``'s rows."""
    if any((path / name).is_file() for name in (datasets.config.DATASET_STATE_JSON_FILENAME,
                                                datasets.config.DATASETDICT_JSON_FILENAME)):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        return _read_dataset(loaded)
    splits = _split_files(path)
    if not splits:
        raise MissingPathError(f"{path}: no data files in this folder, and it is no save_to_disk folder "
                               f"(it reads {FILE_TYPES})", path=path, made_by=shipped_made_by(path))
    if split not in splits:
        raise DataError(f"{path}: no split {split!r}; it has {sorted(splits)}")
    return _read_files([(f, os.path.relpath(f, path)) for f in splits[split]])


def folder_splits(source: str | Path | list[str]) -> list[str]:
    """The splits of a folder read here (a ``save_to_disk`` ``DatasetDict``'s, or a hub layout's, by
    file name); none for a file, a glob, a single ``Dataset`` or a hub id."""
    path = Path(str(source)).expanduser()
    if isinstance(source, (list, tuple)) or not path.is_dir():
        return []
    dict_file = path / datasets.config.DATASETDICT_JSON_FILENAME
    if dict_file.is_file():
        return list(json.loads(dict_file.read_text())["splits"])
    if (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file():
        return []
    return list(_split_files(path))


def holds_text_only(source: str | Path | list[str]) -> bool:
    """Whether ``source`` is CSV (a file, or a folder, glob or list of them), whose every value is text."""
    if isinstance(source, (list, tuple)):
        return all(holds_text_only(s) for s in source)
    path = Path(str(source)).expanduser()
    if path.is_dir():
        files = [f for files in _split_files(path).values() for f in files]
    elif not path.is_file() and glob.has_magic(str(source)):
        files = [f for f, _ in _glob(str(path))]
    else:
        files = [path]
    return bool(files) and all(_file_type(f)[0] == "csv" for f in files)


def _raising(rows: Iterator[tuple[int, dict | DataError]]) -> Iterator[tuple[int, dict]]:
    for number, row in rows:
        if isinstance(row, DataError):
            raise row
        yield number, row


def read_rows(source: str | Path | list[str], split: str = "train", *, keep_malformed: bool = False
              ) -> Iterator[tuple[int, dict | DataError]]:
    """Yield ``(row_number, row)`` from local data files, a folder, a glob, or a hub dataset id.

    A JSON line that is no object is a :class:`DataError`, raised when it is read; with
    ``keep_malformed`` it is yielded in the row's place, for a caller that skips bad rows.

    Files: ``.jsonl``, ``.json`` (a list of objects, or JSON Lines), ``.csv``, ``.parquet``, in
    any case; the text ones also compressed (``.jsonl.gz``). A folder: one written by
    ``datasets.save_to_disk``, or data files as downloaded from a hub (``data/train-00000-of-00002.parquet``,
    ``validation.jsonl``), whose ``split`` is read as ``datasets.load_dataset`` would split them.
    A glob (``data/train-*.parquet``) or a list of files and globs: all their rows, whatever
    ``split``. Anything else that does not exist locally is taken for a hub dataset id and loaded
    with ``datasets.load_dataset``. ``row_number`` is the line number for JSONL/CSV and the
    1-based record index otherwise; from several files it is a :class:`RowNumber`, naming its file.
    """
    rows = _rows(source, split)  # a missing file or split raises here, before any row is read
    return rows if keep_malformed else _raising(rows)


def _rows(source: str | Path | list[str], split: str) -> Iterator[tuple[int, dict | DataError]]:
    """:func:`read_rows`, malformed lines kept."""
    if isinstance(source, (list, tuple)):
        return _read_files(_listed_files([str(s) for s in source]))
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_folder(path, split)
    if not path.is_file() and glob.has_magic(text):
        return _read_files(_glob(str(path)))
    if path.is_file() or _file_type(path)[0] is not None:
        return _read_file(path)
    if path.suffix or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MissingPathError(
            f"data source not found: {text} (expected an existing data file ({FILE_TYPES}), a folder "
            "of them, a glob, a save_to_disk directory, or a hub dataset id 'owner/name')"
        )
    return _read_dataset(datasets.load_dataset(text, split=split))
