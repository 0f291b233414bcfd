"""Ablations of the DRDO loss: each variant layer over the ``drdo`` recipe, several seeds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from drdo_lightning.embedded_default import EMBEDDED
from drdo_lightning.errors import UserError, require_pretrained
from drdo_lightning.experiments.sweeps import (
    DISTINCT,
    SEEDS,
    EvalSettings,
    Evaluator,
    aggregate,
    cell_text,
    measure_label,
    result_cells,
    run_cell,
)
from drdo_lightning.recipes import config_path, recipe_names
from drdo_lightning.reports import markdown_table, new_figure, write_csv
from drdo_lightning.training import RunSpec

log = logging.getLogger(__name__)

def ablation_configs() -> dict[str, Path]:
    """The shipped variants: ``configs/ablations/<name>.yaml``, each a partial DRDO config."""
    folder = "ablations/"
    return {name[len(folder):]: config_path(name) for name in recipe_names() if name.startswith(folder)}


def ablations(
    out: str = "runs/ablations",
    variants: list[str] | None = None,
    seeds: list[int] = list(SEEDS),
    max_steps: int = 150,
    policy: str = str(EMBEDDED / "sft_policy"),
    evaluation: EvalSettings = EvalSettings(),
    overrides: dict[str, Any] | None = None,
) -> str:
    """Train DRDO (paper settings, alpha 0.1, gamma 2) and each variant with each seed; judge; tabulate.

    A variant is a partial config layered over the ``drdo`` recipe (``fit --config drdo
    --config ablations/<name>`` trains one by hand). Writes
    ``cells.csv``, ``ablations.csv``, ``ablations.md`` and ``ablations.png`` under ``out``; the
    starting policy is judged too, as the reference line.

    Args:
        variants: Names under ``configs/ablations/`` or YAML paths (default: all shipped ones).
        seeds: Training seeds per variant.
        max_steps: Optimiser steps per run.
        policy: Starting policy of every run (the SFT policy).
        evaluation: Evaluation settings.
        overrides: Dotted config keys for every training run.
    """
    shipped = ablation_configs()
    chosen: dict[str, Path | None] = {"drdo": None}
    for variant in variants or list(shipped):
        path = shipped.get(variant, Path(variant))
        if not path.is_file():
            raise UserError(f"--variants: unknown ablation {variant!r}: not one of {sorted(shipped)} nor a YAML file")
        chosen[path.stem] = path
    require_pretrained(policy, "policy")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(evaluation)
    start = run_cell(root / "start", evaluator, None, policy=policy)
    cells = []
    for name, config in chosen.items():
        layers = ("drdo",) + ((str(config),) if config is not None else ())
        for seed in seeds:
            run = RunSpec(layers, model=policy, data=evaluation.data_spec(), seed=seed, max_steps=max_steps, validate=False,
                          overrides=overrides or {})
            result = run_cell(root / name / f"seed_{seed}", evaluator, run)
            cells += result_cells(result, variant=name, seed=seed)
    write_csv(cells, root / "cells.csv")
    summary = aggregate(cells, ("variant", "judge"))
    write_csv(summary, root / "ablations.csv")
    judges = [*evaluation.judges, DISTINCT]
    reference = {judge: s["mean"] for judge, s in start["scores"].items()}
    _plot_ablations(summary, list(chosen), judges, reference, root / "ablations.png")
    body = [["start (SFT)", *(f"{reference[j]:+.3f}" for j in judges)]]
    body += [[name] + [cell_text(next((s for s in summary if s["variant"] == name and s["judge"] == j), None)) for j in judges]
             for name in chosen]
    table = "\n".join(["Mean reward over seeds (95% t-interval); `drdo` = paper settings (alpha 0.1, gamma 2).", "",
                       markdown_table(["variant", *judges], body)])
    (root / "ablations.md").write_text(table + "\n")
    print(table)
    return table


def _plot_ablations(summary, variants, judges, reference, path: Path) -> None:
    fig = new_figure(figsize=(4.5 * len(judges), 0.9 + 0.45 * len(variants)), layout="constrained")
    for ax, judge in zip(fig.subplots(1, len(judges), squeeze=False)[0], judges):
        rows = [next(s for s in summary if s["variant"] == v and s["judge"] == judge) for v in variants]
        err = np.nan_to_num(np.array([[s["value"] - s["low"] for s in rows], [s["high"] - s["value"] for s in rows]]))
        ax.barh(range(len(rows)), [s["value"] for s in rows], xerr=err, capsize=3)
        ax.axvline(reference[judge], color="gray", linestyle="--", label="start (SFT)")
        ax.set_yticks(range(len(rows)), variants)
        ax.invert_yaxis()
        ax.set_xlabel(f"mean {measure_label(judge)} (95% CI over seeds)")
    fig.axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
