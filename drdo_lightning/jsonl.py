"""JSON Lines, read and written one way everywhere: one object per line, UTF-8, non-ASCII kept as is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from drdo_lightning.errors import DataError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for every non-blank line; a malformed line is a :class:`DataError`."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        yield from parse_lines(path, enumerate(f, start=1))


def parse_lines(path: Path, lines: Iterable[tuple[int, str]], *, keep_malformed: bool = False
                ) -> Iterator[tuple[int, dict | DataError]]:
    """``(line number, object)`` for every non-blank one of ``(line number, text)`` lines read from ``path``.

    A line that is no JSON object is a :class:`DataError`; with ``keep_malformed`` it comes in the
    object's place instead of being raised, so that a caller skipping bad rows reads on past it.
    """
    for line_no, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = DataError(f"{path}: line {line_no}: malformed JSON ({e.msg} at column {e.colno})")
        else:
            if not isinstance(row, dict):
                row = DataError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
        if isinstance(row, DataError) and not keep_malformed:
            raise row
        yield line_no, row


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` to ``path`` (folders made as needed) through a temporary file renamed over it,
    so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    staging.replace(path)
    return path
