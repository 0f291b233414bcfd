"""What every report is written with: markdown tables, CSV files of records, error-bar plots.

``evaluate``, the experiments and ``splits`` write their results through these, so a table or a
CSV file has one layout wherever it comes from. Plots use matplotlib's object API (no global
backend switch), so notebooks keep theirs.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table: the header, its rule, one line per row of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def write_csv(rows: list[dict], path: Path) -> Path:
    """``rows`` as a CSV file with the first row's keys as its columns (nothing is written for no rows)."""
    if rows:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def new_figure(**kwargs):
    """A matplotlib figure made without pyplot's global state."""
    from matplotlib.figure import Figure  # an optional dependency, needed only for plots

    return Figure(**kwargs)


def interval_bars(ax, x: Sequence[float], estimates: Sequence[dict], label: str) -> None:
    """One series of estimates (``value`` with its interval ``low``..``high``) as points with error
    bars; an interval that could not be computed (one seed) draws none."""
    y = np.array([e["value"] for e in estimates])
    err = np.nan_to_num(np.array([[e["value"] - e["low"] for e in estimates], [e["high"] - e["value"] for e in estimates]]))
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
