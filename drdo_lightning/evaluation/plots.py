"""Plots (matplotlib's object API: no global backend switch, so notebooks keep theirs)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from drdo_lightning.evaluation.statistics import ALL, lookup
from drdo_lightning.reports import interval_bars, new_figure


def plot_win_matrix(rows: list[dict], judge: str, policies: Sequence[str], path: Path) -> Path:
    """Heat map of win rates (ties count half), row policy vs column opponent, over all temperatures."""
    n = len(policies)
    fig = new_figure(figsize=(1.6 + 1.3 * n, 1.2 + 1.1 * n), layout="constrained")
    ax = fig.add_subplot()
    matrix = np.full((n, n), np.nan)
    for i, a in enumerate(policies):
        for j, b in enumerate(policies):
            row = lookup(rows, judge=judge, policy=a, opponent=b, temperature=ALL, statistic="win_rate")
            if row is None:
                continue
            matrix[i, j] = row["value"]
            ax.text(j, i, f"{row['value']:.0%}\n[{row['low']:.0%}, {row['high']:.0%}]", ha="center", va="center", fontsize=8)
    image = ax.imshow(matrix, cmap="RdBu", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), policies, rotation=30, ha="right")
    ax.set_yticks(range(n), policies)
    ax.set_xlabel("opponent")
    ax.set_title(f"win rate of row over column ({judge} judge)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110)
    return path


def plot_reward_vs_temperature(rows: list[dict], judges: Sequence[str], policies: Sequence[str],
                               temperatures: Sequence[float], path: Path) -> Path:
    """Mean reward with its 95% interval against the sampling temperature, one panel per judge."""
    fig = new_figure(figsize=(4.5 * len(judges), 3.6), layout="constrained")
    axes = fig.subplots(1, len(judges), squeeze=False)[0]
    for ax, judge in zip(axes, judges):
        for k, policy in enumerate(policies):
            points = [lookup(rows, judge=judge, policy=policy, temperature=str(t), statistic="mean_reward")
                      for t in temperatures]
            x = np.asarray(temperatures) + (k - (len(policies) - 1) / 2) * 0.006  # dodge overlapping bars
            interval_bars(ax, x, points, policy)
        ax.set_xlabel("temperature")
        ax.set_ylabel(f"mean {judge} reward")
        ax.set_title(judge)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


CURVES = {
    "implicit_accuracy": "implicit preference accuracy (z_w > z_l)",
    "reward_accuracy": "reward accuracy",
    "reward_margin": "reward margin (chosen - rejected)",
    "chosen_logps": "log pi(y_w|x)",
    "rejected_logps": "log pi(y_l|x)",
}


def read_training_log(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``train/*`` series of a CSVLogger ``metrics.csv``: ``{metric: (steps, values)}``.

    ``path`` is the file or a run directory; in a directory the newest ``metrics.csv`` is read.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no metrics.csv under {path}")
        path = found[-1]
    series: dict[str, tuple[list[int], list[float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("train/") and value:
                    steps, values = series.setdefault(key[len("train/"):], ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return series


def plot_training_curves(logs: dict[str, str], path: Path) -> Path:
    """Training curves per run, as the paper's Fig. 4: preference accuracies, reward margin, and the
    chosen and rejected log-probabilities per step. A metric a run does not log is left out."""
    runs = {name: read_training_log(log_path) for name, log_path in logs.items()}
    fig = new_figure(figsize=(12, 6.4), layout="constrained")
    axes = fig.subplots(2, 3).flat
    for ax, (metric, title) in zip(axes, CURVES.items()):
        for k, (name, series) in enumerate(runs.items()):
            if metric in series:
                ax.plot(*series[metric], color=f"C{k}", label=name)  # one colour per run in every panel
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    legend = fig.axes[-1]  # the sixth panel holds the legend
    legend.axis("off")
    legend.legend(*fig.axes[0].get_legend_handles_labels(), loc="center")
    fig.savefig(path, dpi=110)
    return path
