"""The tables and the plot of :func:`experiments.protocol.protocol`, from its finished cells.

A cell's ``scores.json`` holds ``scores[family][measure]`` for the two prompt families
(:data:`IN_DISTRIBUTION`, :data:`OUT_OF_DISTRIBUTION`; each measure a ``mean``, ``by_temperature``
and, for the judges, ``by_prompt``) and ``scores[MARGINS]``, the validation pairs' margins
(:mod:`evaluation.margins`). Results map a condition's name to ``{(method, seed): cell}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from drdo_lightning.data.readers import read_rows
from drdo_lightning.evaluation.margins import IMPLICIT, LOGP, REWARD_HEAD
from drdo_lightning.evaluation.statistics import margin_bin_accuracy, paired_comparison
from drdo_lightning.experiments.sweeps import DISTINCT, KL, beyond_edge, cell_text, measure_label, seed_interval
from drdo_lightning.reports import markdown_table, new_figure, write_csv

IN_DISTRIBUTION, OUT_OF_DISTRIBUTION = "in", "ood"
MARGINS = "margins"


def _measures(result: dict, family: str) -> dict[str, dict]:
    return result["scores"][family]


def condition_table(cells: dict[tuple[str, int], dict], methods: list[str], measures: list[str], family: str) -> str:
    """Per method, each measure's mean over seeds with its 95% t-interval, on one prompt family."""
    body = []
    for method in methods:
        runs = [r for (m, _), r in sorted(cells.items()) if m == method]
        if not runs:
            continue
        row = [method, str(len(runs))]
        for measure in measures:
            values = [_measures(r, family)[measure]["mean"] for r in runs if measure in _measures(r, family)]
            row.append(cell_text(seed_interval(values)._asdict()) if values else "-")
        body.append(row)
    return markdown_table(["method", "seeds", *map(measure_label, measures)], body)


def win_rates(cells: dict[tuple[str, int], dict], methods: list[str], baseline: str = "dpo",
              family: str = IN_DISTRIBUTION) -> str:
    """Each method's gold win rate against ``baseline`` trained with the same seed (ties half), per
    seed over prompts and temperatures; the mean over seeds with the seeds' 95% t-interval."""
    body = []
    for method in methods:
        if method == baseline:
            continue
        rates = [paired_comparison(np.array(r["scores"][family]["gold"]["by_prompt"]),
                                   np.array(cells[(baseline, seed)]["scores"][family]["gold"]["by_prompt"]))
                 ["win_rate"].value for (m, seed), r in sorted(cells.items()) if m == method and (baseline, seed) in cells]
        if rates:
            estimate = seed_interval(rates)
            body.append([method, str(len(rates)), cell_text(estimate._asdict())])
    return markdown_table(["method", "seeds", f"gold win rate vs {baseline}"], body)


def margin_bins(cells: dict[tuple[str, int], dict], val_file: str, oracle_val: str, bins: int = 5) -> str:
    """Ranking accuracy against the gold sign on the validation pairs, by quintile of |gold margin|:
    DRDO's reward head and log-prob margin, the others' implicit reward, the condition's Oracle."""
    rows = [row for _, row in read_rows(val_file)]
    gold = [r["gold_chosen"] - r["gold_rejected"] for r in rows]
    oracle = [r["oracle_chosen"] - r["oracle_rejected"] for _, r in read_rows(oracle_val)]
    rankers = {"Oracle": [[float(x) for x in oracle]]}
    for (method, _), r in sorted(cells.items()):
        margins = r["scores"][MARGINS]
        if method.startswith("drdo"):
            rankers.setdefault(f"{method} reward head", []).append(margins[REWARD_HEAD])
            rankers.setdefault(f"{method} log-prob margin", []).append(margins[LOGP])
        elif method == "simpo":
            rankers.setdefault(f"{method} log-prob margin", []).append(margins[LOGP])
        else:
            rankers.setdefault(f"{method} implicit reward", []).append(margins[IMPLICIT])
    body = []
    edges = None
    for name, runs in rankers.items():
        per_seed = [margin_bin_accuracy(gold, {name: m}, bins=bins) for m in runs]
        edges = [(r["low"], r["high"]) for r in per_seed[0]]
        accuracies = [[r["accuracy"] for r in seed] for seed in per_seed]
        body.append([name, str(len(runs))] + [cell_text(seed_interval([a[b] for a in accuracies])._asdict())
                                              for b in range(bins)])
    header = ["ranker", "seeds", *(f"|Δ| {lo:.2f}-{hi:.2f}" for lo, hi in edges or [])]
    return markdown_table(header, body)


def splits_table(results: dict[str, dict[tuple[str, int], dict]], conditions, methods: list[str],
                 measure: str = "gold", family: str = IN_DISTRIBUTION) -> str:
    """The paper's Table 1 view: per teacher arm, each method's ``measure`` (mean over seeds, 95%
    t-interval) on each split it was trained on, the conditions of the same arm side by side."""
    arms: dict[str, list] = {}
    for c in conditions:
        if c.split and results.get(c.name):
            arms.setdefault(c.teacher, []).append(c)
    tables = []
    for arm, arm_conditions in arms.items():
        body = []
        for method in methods:
            row = [method]
            for c in arm_conditions:
                values = [_measures(r, family)[measure]["mean"] for (m, _), r in sorted(results[c.name].items())
                          if m == method]
                row.append(f"{cell_text(seed_interval(values)._asdict())} ({len(values)})" if values else "-")
            if any(cell != "-" for cell in row[1:]):
                body.append(row)
        header = [f"method ({arm} teachers)", *(f"{c.split}: {c.name}" for c in arm_conditions)]
        tables.append(markdown_table(header, body))
    return "\n\n".join(tables)


def frontier_plot(results: dict[str, dict[tuple[str, int], dict]], methods: list[str], path: Path,
                  columns: int = 4) -> None:
    """Gold reward against KL to the starting policy, one point per seed, a panel per condition
    (``columns`` panels to a row)."""
    names = [n for n, cells in results.items() if cells]
    if not names:
        return
    cols = min(columns, len(names))
    rows = math.ceil(len(names) / cols)
    fig = new_figure(figsize=(4 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):
        for method in methods:
            points = [(_measures(r, IN_DISTRIBUTION)[KL]["mean"], _measures(r, IN_DISTRIBUTION)["gold"]["mean"])
                      for (m, _), r in results[name].items() if m == method]
            if points:
                ax.scatter(*zip(*points), label=method, s=14)
        ax.set_xlabel("KL(π || π_SFT), nats")
        ax.set_ylabel("gold reward")
        ax.set_title(name, fontsize=9)
    handles = {}  # one legend for every panel: a method may be missing from the first (dpo_relabelled)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
    fig.savefig(path, dpi=110)


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def teacher_table(teacher_sets: dict[str, dict[str, Any]]) -> str:
    """Each teacher set's accuracy on its own held-out labels (as exported) and the Oracle's against the gold sign."""
    body = []
    for name, t in teacher_sets.items():
        oracle = t["validation"]["oracle"]
        members = [v["reward_accuracy"] for k, v in t["validation"].items() if k.startswith("member_")]
        body.append([name, _accuracy(oracle["reward_accuracy"]), f"{oracle['step']} ({oracle['global_step']})",
                     _accuracy(t["oracle_gold_accuracy"]), ", ".join(map(_accuracy, members))])
    return markdown_table(["teachers", "Oracle held-out accuracy (own labels)", "Oracle step kept (steps run)",
                           "Oracle vs gold sign (validation pairs)", "ensemble held-out accuracy"], body)


def tuning_table(tried: dict[str, dict[float, dict]], chosen: dict[str, float], rates: dict[str, list[float]],
                 floor: float) -> str:
    """Per method, the gold reward and distinct-2 at every learning rate tried, the choice, and
    whether it sits at an edge of its grid."""
    lines = [f"Mean gold reward and distinct-2 on the tuning prompts (one seed) per learning rate; a rate qualifies "
             f"with distinct-2 of at least {floor:.3f}:", ""]
    for m, by_rate in tried.items():
        lines.append(f"- {m}: " + ", ".join(
            f"lr {lr:g}: {by_rate[lr]['gold']['mean']:+.3f} ({by_rate[lr][DISTINCT]['mean']:.3f})"
            + (" **chosen**" if lr == chosen[m] else "") for lr in sorted(by_rate)))
    edge = [m for m in tried if beyond_edge(chosen[m], rates[m]) is not None]
    return "\n".join([*lines, "", "Chosen at an edge of its grid: " + (", ".join(edge) if edge else "none")])


def write_report(results, methods, conditions, teacher_sets, val_data, teacher_key, root: Path) -> str:
    """``protocol.md`` (teachers, then a section per condition with cells), ``teachers.md``, ``cells.csv``,
    ``frontier.png``, from the finished cells; a condition without any is listed as not run yet."""
    measures = ["gold", "oracle", DISTINCT, KL]
    cells_rows = []
    lines = ["## Teachers", "", teacher_table(teacher_sets), ""]
    if (root / "chosen.json").is_file():
        chosen = json.loads((root / "chosen.json").read_text())
        lines += ["Learning rates chosen on the tuning condition (`tuning.md`): "
                  + ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()), ""]
    for c in conditions:
        cells = results.get(c.name, {})
        note = f" (secondary: {c.seeds} seeds)" if c.seeds else ""
        if not cells:
            lines += [f"## {c.name}{note}", "", "Not run yet.", ""]
            continue
        present = [m for m in methods if any(k[0] == m for k in cells)]
        for (m, seed), r in cells.items():
            for family in (IN_DISTRIBUTION, OUT_OF_DISTRIBUTION):
                cells_rows += [{"condition": c.name, "method": m, "seed": seed, "prompts": family, "measure": k,
                                "value": v["mean"]} for k, v in r["scores"][family].items()]
        seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in cells.values())
        lines += [f"## {c.name}{note}", "", f"{len(cells)} cells, {seconds / 60:.0f} min of training and judging "
                  "(one torch thread each).", "",
                  "Evaluation prompts (mean over seeds, 95% t-interval):", "",
                  condition_table(cells, present, measures, IN_DISTRIBUTION), "",
                  "Out-of-distribution prompts:", "", condition_table(cells, present, measures, OUT_OF_DISTRIBUTION), "",
                  win_rates(cells, present), ""]
        key = teacher_key(c)
        if key in teacher_sets:
            lines += ["Ranking accuracy on the validation pairs by quintile of |gold margin| (mean over seeds):", "",
                      margin_bins(cells, val_data, teacher_sets[key]["val"]), ""]
    table1 = splits_table(results, conditions, methods)
    if table1:
        lines += ["## The splits side by side", "",
                  f"{measure_label('gold')} on the evaluation prompts (mean over seeds, 95% t-interval; seeds):", "",
                  table1, ""]
    write_csv(cells_rows, root / "cells.csv")
    frontier_plot(results, methods, root / "frontier.png")
    text = "\n".join(lines)
    (root / "teachers.md").write_text(teacher_table(teacher_sets) + "\n")
    (root / "protocol.md").write_text(text + "\n")
    return text
