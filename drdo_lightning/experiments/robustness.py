"""Robustness to label noise: every method at every label-flip rate, several seeds, one budget."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from drdo_lightning.embedded_default import EMBEDDED
from drdo_lightning.errors import MissingPathError, require_pretrained
from drdo_lightning.experiments.sweeps import (
    DISTINCT,
    FLIP_RATES,
    FLIP_SEED,
    SEEDS,
    STUDENTS,
    EvalSettings,
    Evaluator,
    aggregate,
    cell_text,
    measure_label,
    noisy_judges,
    plot_against_flip_rate,
    result_cells,
    run_cell,
)
from drdo_lightning.reports import markdown_table, write_csv
from drdo_lightning.stages import oracle_accuracy, scored_files
from drdo_lightning.training import RunSpec

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
    start = run_cell(root / "start", evaluator, None, policy=policy)
    spec = evaluation.data_spec()
    cells, judge_accuracy = [], {}
    for rate in flip_rates:
        shared = RunSpec("oracle", model=policy, data=spec, label_flip_rate=rate, flip_seed=FLIP_SEED, validate=False,
                         overrides=overrides or {})
        rate_dir = root / f"flip_{rate}"
        data = {"train": train_data, "val": val_data}
        if judges_from is not None:
            data = _finished_judges(Path(judges_from) / rate_dir.name / "judges")
        elif retrain_judges:
            data = noisy_judges(rate_dir / "judges", train_data, val_data, policy, members,
                                replace(shared, max_steps=judge_steps), oracle_policy=oracle_policy)
        if judges_from is not None or retrain_judges:
            judge_accuracy[rate] = oracle_accuracy(data["val"])
        for seed in seeds:
            for method in methods:
                student = replace(shared, recipe=method, seed=seed, train_file=data["train"], val_file=data["val"],
                                  max_steps=max_steps, one_model_in_memory=True)
                result = run_cell(rate_dir / f"seed_{seed}" / method, evaluator, student)
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
        body = [[method] + [cell_text(next((s for s in summary if s["method"] == method and s["flip_rate"] == r
                                            and s["judge"] == judge), None)) for r in flip_rates] for method in methods]
        lines += [f"Mean {measure_label(judge)} (over seeds; 95% t-interval); starting policy: {reference[judge]:+.3f}", "",
                  markdown_table(["method", *(f"flip {r:g}" for r in flip_rates)], body), ""]
    if judge_accuracy:
        lines += ["Retrained Oracle's accuracy on clean validation pairs: "
                  + ", ".join(f"flip {r:g}: {a:.3f}" for r, a in judge_accuracy.items())]
    return "\n".join(lines).rstrip()

