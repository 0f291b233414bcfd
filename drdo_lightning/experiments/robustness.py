"""Robustness to label noise: every method at every label-flip rate, several seeds, one budget."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from drdo_lightning.embedded_default import EMBEDDED
from drdo_lightning.errors import MissingPathError, require_pretrained
from drdo_lightning.evaluation.plots import new_figure
from drdo_lightning.experiments.pipeline import STUDENTS
from drdo_lightning.experiments.sweeps import (
    DISTINCT,
    FLIP_RATES,
    FLIP_SEED,
    SEEDS,
    EvalSettings,
    Evaluator,
    aggregate,
    cell_text,
    measure_label,
    result_cells,
    run_cell,
    write_csv,
)
from drdo_lightning.objectives import ReferenceModule
from drdo_lightning.recipes import recipe_objective
from drdo_lightning.stages import DataSpec, oracle_accuracy, scored_files, train_judges_and_score

log = logging.getLogger(__name__)

def robustness(
    out: str = "runs/robustness",
    flip_rates: list[float] = list(FLIP_RATES),
    methods: list[str] = list(STUDENTS),
    seeds: list[int] = list(SEEDS),
    max_steps: int = 150,
    retrain_judges: bool = True,
    judge_steps: int = 125,
    members: int = 3,
    policy: str = str(EMBEDDED / "sft_policy"),
    train_data: str = str(EMBEDDED / "data" / "train.jsonl"),
    val_data: str = str(EMBEDDED / "data" / "val.jsonl"),
    evaluation: EvalSettings = EvalSettings(),
    overrides: dict[str, Any] | None = None,
    judges_from: str | None = None,
    oracle_policy: str | None = None,
) -> str:
    """Train each method at each label-flip rate with each seed (same budget), judge, plot, tabulate.

    At flip rate ``r`` exactly ``round(r * n)`` training pairs have chosen and rejected swapped
    (``data.label_flip_rate``; their Oracle scores move with them; validation pairs are never
    flipped). With ``retrain_judges`` (the default) the Oracle and the e-DPO ensemble are
    retrained on the same noisy labels at every rate and rescore the data, so DRDO and e-DPO
    distil from judges that saw the noise, as they would in practice. With
    ``retrain_judges=False`` they use the shipped scores of judges trained on clean labels: the
    distillation losses are then blind to the flips (a flip negates both margins of a squared
    difference), which measures a clean-teacher upper bound, not robustness.

    Every policy is judged by ``evaluation.judges`` (default: the gold VADER reward and the shipped,
    clean-label Oracle: a fixed ruler across rates). Writes ``cells.csv`` (one row per rate,
    method, seed and judge), ``robustness.csv`` and ``robustness.md`` (means over seeds with 95%
    t-intervals) and ``robustness.png`` under ``out``.

    Args:
        flip_rates: Fractions of training labels to flip.
        methods: Student recipes (``configs/<name>.yaml``).
        seeds: Training seeds (``seed_everything``) per method and rate.
        max_steps: Optimiser steps per student (the same budget for every method).
        retrain_judges: Retrain the Oracle and ensemble on the noisy labels at each rate.
        judge_steps: Optimiser steps of the Oracle and of each ensemble member when retrained.
        members: e-DPO ensemble size when retrained (at least 2: e-DPO reads a list of scores per response).
        policy: Starting policy of every student and judge (the SFT policy).
        train_data, val_data: Preference pairs; without ``retrain_judges`` they must carry the
            Oracle and ensemble score columns the recipes read.
        evaluation: Evaluation settings (prompts, judges, temperatures, ...).
        overrides: Dotted config keys for every training run, e.g. ``{"data.cache_dir": "/tmp/c"}``.
        judges_from: Output directory of an earlier sweep whose retrained judges (and the data they
            scored) to use at every rate instead of training new ones, so a variant (other
            ``overrides``, other methods) is compared under the very same judges.
        oracle_policy: The SFT policy the retrained Oracle starts from (default: ``policy``), e.g.
            the larger one ``compare`` trains (``<its out>/oracle_policy/sft/export``).
    """
    require_pretrained(policy, "policy")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(evaluation)
    start = run_cell(root / "start", evaluator, configs=None, policy=policy)
    spec = evaluation.data_spec()
    cells, judge_accuracy = [], {}
    for rate in flip_rates:
        common = {"model.model": policy, "data.label_flip_rate": rate, "data.seed": FLIP_SEED,
                  **spec.fit_overrides(), **(overrides or {})}
        rate_dir = root / f"flip_{rate}"
        data = {"train": train_data, "val": val_data}
        if judges_from is not None:
            data = _finished_judges(Path(judges_from) / rate_dir.name / "judges")
        elif retrain_judges:
            judge_settings = {"trainer.max_steps": judge_steps, "trainer.limit_val_batches": 0, **common}
            data = noisy_judges(rate_dir / "judges", train_data, val_data, policy, members, spec, judge_settings,
                                oracle_policy=oracle_policy)
        if judges_from is not None or retrain_judges:
            judge_accuracy[rate] = oracle_accuracy(data["val"])
        for seed in seeds:
            for method in methods:
                settings = {"seed_everything": seed, "data.train_file": str(data["train"]),
                            "data.val_file": str(data["val"]), "trainer.max_steps": max_steps,
                            "trainer.limit_val_batches": 0, **common}
                if issubclass(recipe_objective(method), ReferenceModule):  # as a live reference, one model in memory
                    settings["model.precompute_reference"] = True
                result = run_cell(rate_dir / f"seed_{seed}" / method, evaluator, [method], settings)
                cells += result_cells(result, flip_rate=rate, method=method, seed=seed)
    write_csv(cells, root / "cells.csv")
    summary = aggregate(cells, ("flip_rate", "method"))
    write_csv(summary, root / "robustness.csv")
    reference = {judge: s["mean"] for judge, s in start["scores"].items()}
    measures = [*evaluation.judges, DISTINCT]
    plot_against_flip_rate(summary, methods, measures, reference, root / "robustness.png")
    table = _robustness_table(summary, methods, flip_rates, measures, reference, judge_accuracy)
    (root / "robustness.md").write_text(table + "\n")
    print(table)
    return table


def noisy_judges(work: Path, train_data: str, val_data: str, policy: str, members: int, spec: DataSpec,
                 overrides: dict[str, Any], oracle_policy: str | None = None) -> dict[str, Path]:
    """The data rescored by the Oracle and ensemble retrained on this rate's noisy labels (trained if missing).

    The Oracle starts from ``oracle_policy`` (default: ``policy``, where the ensemble starts).
    """
    scored = scored_files(work)
    if not all(p.is_file() for p in scored.values()):
        shutil.rmtree(work, ignore_errors=True)
        train_judges_and_score(work, {"train": Path(train_data), "val": Path(val_data)}, Path(policy), FLIP_SEED,
                               members, spec, overrides, oracle_policy=Path(oracle_policy) if oracle_policy else None)
    return scored


def _finished_judges(work: Path) -> dict[str, Path]:
    """The data rescored by judges another sweep retrained (``--judges_from``); they must exist."""
    scored = scored_files(work)
    if not all(p.is_file() for p in scored.values()):
        raise MissingPathError(f"no retrained judges in {work}: the sweep named by --judges_from has not "
                                "finished this flip rate's judges")
    return scored


def _robustness_table(summary, methods, flip_rates, judges, reference, judge_accuracy) -> str:
    lines = []
    for judge in judges:
        lines += [f"Mean {measure_label(judge)} (over seeds; 95% t-interval); starting policy: {reference[judge]:+.3f}", "",
                  "| method | " + " | ".join(f"flip {r:g}" for r in flip_rates) + " |", "|---" * (len(flip_rates) + 1) + "|"]
        for method in methods:
            row = [cell_text(next((s for s in summary if s["method"] == method and s["flip_rate"] == r
                                    and s["judge"] == judge), None)) for r in flip_rates]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
    if judge_accuracy:
        lines += ["Retrained Oracle's accuracy on clean validation pairs: "
                  + ", ".join(f"flip {r:g}: {a:.3f}" for r, a in judge_accuracy.items())]
    return "\n".join(lines).rstrip()


def plot_against_flip_rate(summary, methods, judges, reference, path: Path) -> None:
    """Each judge's mean over seeds (95% t-interval) against the flip rate, a line per method; the
    starting policy as a dashed line. ``summary`` rows: :func:`aggregate` by flip rate and method."""
    fig = new_figure(figsize=(5 * len(judges), 3.8), layout="constrained")
    for ax, judge in zip(fig.subplots(1, len(judges), squeeze=False)[0], judges):
        for k, method in enumerate(methods):
            rows = sorted((s for s in summary if s["method"] == method and s["judge"] == judge), key=lambda s: s["flip_rate"])
            x = np.array([s["flip_rate"] for s in rows]) + (k - (len(methods) - 1) / 2) * 0.004  # dodge the bars
            y = np.array([s["value"] for s in rows])
            err = np.nan_to_num(np.array([[s["value"] - s["low"] for s in rows], [s["high"] - s["value"] for s in rows]]))
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.axhline(reference[judge], color="gray", linestyle="--", label="start (SFT)")
        ax.set_xlabel("label flip rate")
        ax.set_ylabel(f"mean {measure_label(judge)}")
        ax.set_title(f"{measure_label(judge)} vs label noise (95% CI over seeds)", fontsize=9)
    fig.axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
