"""The tables and plots of :func:`experiments.protocol.protocol`, from its finished cells.

A cell's ``scores.json`` holds ``scores[family][measure]`` for each prompt family it was judged on
(:data:`IN_DISTRIBUTION`, and :data:`OUT_OF_DISTRIBUTION` when the protocol has out-of-distribution
prompts; each measure a ``mean``, ``by_temperature`` and, for the judges, ``by_prompt``) and
``scores[MARGINS]``, the validation pairs' margins (:mod:`evaluation.margins`). Results map a
condition's name to ``{(method, seed): cell}``.

Every table of means over seeds is one pivot of the summary (:func:`summarize`: per condition,
method, prompt family, measure and temperature, the mean over seeds with its 95% t-interval). The
report's *views* (:data:`VIEWS`) choose which pivots it shows: a section per condition, a measure
across the conditions, a measure by temperature, the paper's Table 1 splits side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from drdo_lightning.data.readers import read_rows
from drdo_lightning.evaluation.margins import IMPLICIT, LOGP, REWARD_HEAD
from drdo_lightning.evaluation.statistics import margin_bin_accuracy, paired_comparison
from drdo_lightning.experiments.cells import IN_DISTRIBUTION, MARGINS, OUT_OF_DISTRIBUTION
from drdo_lightning.experiments.conditions import GIVEN, GOLD_COLUMNS, Condition
from drdo_lightning.experiments.frontier import Frontiers
from drdo_lightning.experiments.sweeps import DISTINCT, KL, aggregate, beyond_edge, cell_text, measure_label, seed_interval
from drdo_lightning.experiments.tuning import CORRELATION, LEARNING_RATE, extensible, setting_name
from drdo_lightning.reports import interval_bars, markdown_table, new_figure, write_csv

PAIRS = "pairs"  # the "family" of measures taken on the validation pairs rather than on prompts
POOLED = "all"  # the temperature of a measure pooled over temperatures
FAMILY_TITLES = {IN_DISTRIBUTION: "Evaluation prompts", OUT_OF_DISTRIBUTION: "Out-of-distribution prompts",
                 PAIRS: "Validation pairs"}
# The report's views, each a kind of section of protocol.md.
VIEWS = ("conditions", "across", "temperatures", "splits")
SUMMARY_KEYS = ("condition", "method", "prompts", "measure", "temperature")


def label(measure: str) -> str:
    """What a measure is, for a table's heading."""
    if measure == CORRELATION:
        return "student/Oracle reward-margin correlation on the validation pairs"
    return measure_label(measure)


# ---------------------------------------------------------------------------------------
# Cells -> rows -> summary


def teacher_margins(teacher_set: dict[str, Any] | None) -> list[float] | None:
    """The Oracle's margins on the validation pairs of a teacher set, in file order (None without Oracle scores)."""
    if teacher_set is None:
        return None
    rows = [r for _, r in read_rows(str(teacher_set["val"]))]
    if "oracle_chosen" not in rows[0]:
        return None
    return [r["oracle_chosen"] - r["oracle_rejected"] for r in rows]


def cell_rows(results: dict[str, dict[tuple[str, int], dict]], temperatures: Sequence[float],
              margins_of: dict[str, list[float] | None]) -> list[dict]:
    """One row per cell, prompt family, measure and temperature (:data:`POOLED` and each of
    ``temperatures``); and, for a model with a reward head whose condition's teachers scored the
    validation pairs (``margins_of[condition]``), its :data:`CORRELATION` with them."""
    rows = []
    for condition, cells in results.items():
        for (method, seed), cell in cells.items():
            key = {"condition": condition, "method": method, "seed": seed}
            for family, measures in cell["scores"].items():
                if family == MARGINS:
                    continue
                for measure, s in measures.items():
                    by_temperature = zip(map(str, temperatures), s.get("by_temperature", []))
                    rows += [{**key, "prompts": family, "measure": measure, "temperature": t, "value": v}
                             for t, v in [(POOLED, s["mean"]), *by_temperature]]
            margins, teacher = cell["scores"].get(MARGINS, {}), margins_of.get(condition)
            if REWARD_HEAD in margins and teacher is not None:
                rows.append({**key, "prompts": PAIRS, "measure": CORRELATION, "temperature": POOLED,
                             "value": float(np.corrcoef(margins[REWARD_HEAD], teacher)[0, 1])})
    return rows


def summarize(rows: list[dict]) -> dict[tuple, dict]:
    """Per condition, method, family, measure and temperature: the mean over seeds with its 95%
    t-interval (:func:`sweeps.aggregate`), keyed by those five."""
    return {tuple(s[k] for k in SUMMARY_KEYS): s for s in aggregate(rows, SUMMARY_KEYS, value="value")}


# ---------------------------------------------------------------------------------------
# The pivots


def pivot(summary: dict[tuple, dict], rows: list[tuple[str, ...]], columns: list[tuple[str, str, str, str]],
          with_seeds: bool = False) -> list[list[str]]:
    """A table body: per row ``(condition, method)`` a cell per column ``(prompts, measure, temperature,
    condition or None)`` (None: the row's condition), each the mean over seeds with its interval
    (``with_seeds``: and how many, in brackets); rows without any cell are left out."""
    body = []
    for condition, method in rows:
        found = [summary.get((c or condition, method, family, measure, t)) for family, measure, t, c in columns]
        if any(found):
            texts = [cell_text(s) + (f" ({s['seeds']})" if with_seeds and s else "") for s in found]
            body.append(texts)
    return body


def condition_table(summary, condition: str, methods: list[str], measures: list[str], family: str) -> str:
    """Per method, each measure's mean over seeds with its 95% t-interval, on one prompt family."""
    columns = [(family, m, POOLED, None) for m in measures]
    body = []
    for method in methods:
        (row,) = pivot(summary, [(condition, method)], columns) or [None]
        if row is not None:
            seeds = max(s["seeds"] for m in measures if (s := summary.get((condition, method, family, m, POOLED))))
            body.append([method, str(seeds), *row])
    return markdown_table(["method", "seeds", *map(label, measures)], body)


def across_table(summary, conditions: list[Condition], methods: list[str], measure: str, family: str,
                 with_seeds: bool = False) -> str:
    """Per method, one measure's mean over seeds (95% t-interval) on each condition, side by side."""
    columns = [(family, measure, POOLED, c.name) for c in conditions]
    body = [[m, *row] for m in methods for row in pivot(summary, [("", m)], columns, with_seeds)]
    return markdown_table(["method", *(c.name for c in conditions)], body)


def temperature_table(summary, conditions: list[Condition], methods: list[str], measure: str, family: str,
                      temperatures: Sequence[float]) -> str:
    """Per condition and method, one measure's mean over seeds (95% t-interval), pooled and per temperature."""
    temps = [POOLED] if family == PAIRS else [POOLED, *map(str, temperatures)]
    columns = [(family, measure, t, None) for t in temps]
    body = [[c.name, m, *row] for c in conditions for m in methods for row in pivot(summary, [(c.name, m)], columns)]
    return markdown_table(["condition", "method", *("pooled" if t == POOLED else f"T = {t}" for t in temps)], body)


def splits_table(summary, conditions: list[Condition], methods: list[str], measure: str = "gold",
                 family: str = IN_DISTRIBUTION) -> str:
    """The paper's Table 1 view: per teacher arm, each method's ``measure`` (mean over seeds, 95%
    t-interval, seeds) on each split it was trained on, the conditions of the same arm side by side."""
    arms: dict[str, list[Condition]] = {}
    for c in conditions:
        if c.split and any(k[0] == c.name for k in summary):
            arms.setdefault(c.teacher, []).append(c)
    tables = []
    for arm, arm_conditions in arms.items():
        table = across_table(summary, arm_conditions, methods, measure, family, with_seeds=True).splitlines()
        header = f"| method ({arm} teachers) | " + " | ".join(f"{c.split}: {c.name}" for c in arm_conditions) + " |"
        tables.append("\n".join([header, *table[1:]]))
    return "\n\n".join(tables)


# ---------------------------------------------------------------------------------------
# Tables that are not means of a cell's measures


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
    a reward head's and its policy's log-prob margin (DRDO), the log-prob margin of a student whose
    reward it is (SimPO, DRDO without a head), the others' implicit reward, the condition's Oracle."""
    rows = [row for _, row in read_rows(val_file)]
    gold = [r["gold_chosen"] - r["gold_rejected"] for r in rows]
    oracle = [r["oracle_chosen"] - r["oracle_rejected"] for _, r in read_rows(oracle_val)]
    rankers = {"Oracle": [[float(x) for x in oracle]]}
    for (method, _), r in sorted(cells.items()):
        margins = r["scores"][MARGINS]
        if REWARD_HEAD in margins:
            rankers.setdefault(f"{method} reward head", []).append(margins[REWARD_HEAD])
            rankers.setdefault(f"{method} log-prob margin", []).append(margins[LOGP])
        elif method.startswith("drdo") or method == "simpo":  # a reward of log-probs: DRDO without a head
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


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def teacher_table(teacher_sets: dict[str, dict[str, Any]]) -> str:
    """Each trained teacher set's accuracy where it validated (as exported), and its Oracle's on the
    validation pairs: against their labels and against the gold sign."""
    body = []
    for name, t in teacher_sets.items():
        if "validation" not in t:  # the data's own scores: nothing was trained
            continue
        oracle = t["validation"]["oracle"]
        members = [v["reward_accuracy"] for k, v in t["validation"].items() if k.startswith("member_")]
        body.append([name, f"{_accuracy(oracle['reward_accuracy'])} ({oracle.get('selection', '-')})",
                     f"{oracle['step']} ({oracle['global_step']})", _accuracy(t.get("oracle_accuracy")),
                     _accuracy(t.get("oracle_gold_accuracy")), ", ".join(map(_accuracy, members))])
    return markdown_table(["teachers", "Oracle validation accuracy (on)", "Oracle step kept (steps run)",
                           "Oracle vs validation labels", "Oracle vs gold sign (validation pairs)",
                           "ensemble validation accuracy"], body)


def tried_around(entries: list[dict], chosen: dict[str, Any], axis: str) -> list:
    """The values of ``axis`` tried with every other axis at its chosen value, in order."""
    return sorted({e["setting"][axis] for e in entries
                   if all(e["setting"].get(a) == v for a, v in chosen.items() if a != axis)})


def _tried_text(entries: list[dict], chosen: dict[str, Any], axis: str) -> str:
    """``0.001, 0.003 (chosen at an edge)``: an axis's values around the choice, flagged where the choice
    is the largest or smallest of several numbers tried (a form or a switch has no edge)."""
    tried = tried_around(entries, chosen, axis)
    edge = extensible(tried) and beyond_edge(chosen[axis], tried) is not None
    return ", ".join(f"{v:g}" if extensible([v]) else str(v) for v in tried) + (" (chosen at an edge)" if edge else "")


def tuning_table(tuned: dict[str, list[dict]], chosen: dict[str, dict], floor: float, start: dict[str, Any],
                 max_kl: float | None = None) -> str:
    """Every tuned setting's measures on the tuning prompts (the chosen one in bold); the learning rates
    and the knob values each method tried around its choice, and whether the choice sits at an edge of them."""
    measures = list(dict.fromkeys(["gold", DISTINCT, *(k for es in tuned.values() for e in es for k in e if k != "setting")]))
    body = []
    for method, entries in tuned.items():
        for e in entries:
            name = setting_name(e["setting"])
            body.append([method, f"**{name}**" if e["setting"] == chosen[method] else name,
                         *(f"{e[m]:+.3f}" if m in e and not math.isnan(e[m]) else "-" for m in measures)])
    rates = "; ".join(f"{m}: {_tried_text(tuned[m], chosen[m], LEARNING_RATE)}" for m in tuned)
    knobs = "; ".join(f"{m}: " + ", ".join(f"{axis.removeprefix('model.')} {_tried_text(tuned[m], chosen[m], axis)}"
                                          for axis in chosen[m] if axis != LEARNING_RATE)
                      for m in tuned if len(chosen[m]) > 1)
    budget = f" and KL to the start of at most {max_kl:g} nats" if max_kl is not None else ""
    return "\n".join([
        "Tuning (one seed) on the tuning prompts; **bold**: the chosen setting, the best gold reward among those "
        f"with distinct-2 of at least {floor:.3f}{budget}. Starting policy: "
        + ", ".join(f"{m} {s['mean']:+.3f}" for m, s in start.items()), "",
        f"Learning rates tried at the chosen knobs: {rates}.", "",
        *([f"Knob values tried at the chosen other settings: {knobs}.", ""] if knobs else []),
        markdown_table(["method", "setting", *("margin corr." if m == CORRELATION else m for m in measures)], body)])


# ---------------------------------------------------------------------------------------
# Plots


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
            points = [(r["scores"][IN_DISTRIBUTION][KL]["mean"], r["scores"][IN_DISTRIBUTION]["gold"]["mean"])
                      for (m, _), r in results[name].items() if m == method]
            if points:
                ax.scatter(*zip(*points), label=method, s=14)
        ax.set_xlabel("KL(π || π_SFT), nats")
        ax.set_ylabel("gold reward")
        ax.set_title(name, fontsize=9)
    handles = {}  # one legend for every panel: a method may be missing from the first (dpo_relabelled)
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
    fig.savefig(path, dpi=110)


def across_plot(summary, conditions: list[Condition], methods: list[str], measures: list[str],
                reference: dict[str, float], path: Path) -> None:
    """Each measure's mean over seeds (95% t-interval) on the evaluation prompts against the
    condition, a line per method; the starting policy as a dashed line."""
    names = [c.name for c in conditions if any(k[0] == c.name for k in summary)]
    if not names:
        return
    fig = new_figure(figsize=(max(5, 1.2 * len(names)) * len(measures), 3.8), layout="constrained")
    for ax, measure in zip(fig.subplots(1, len(measures), squeeze=False)[0], measures):
        for k, method in enumerate(methods):
            points = [(i, s) for i, n in enumerate(names)
                      if (s := summary.get((n, method, IN_DISTRIBUTION, measure, POOLED)))]
            if points:
                x = np.array([i for i, _ in points]) + (k - (len(methods) - 1) / 2) * 0.04  # dodge the bars
                interval_bars(ax, x, [s for _, s in points], method)
        if measure in reference:
            ax.axhline(reference[measure], color="gray", linestyle="--", label="start (SFT)")
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_ylabel(f"mean {label(measure)}")
        ax.set_title(f"{label(measure)} (95% CI over seeds)", fontsize=9)
    fig.axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------
# The report


def _condition_section(c: Condition, cells, methods, summary, measures, families, teacher_set, val_data) -> list[str]:
    note = f" (secondary: {c.seeds} seeds)" if c.seeds else ""
    if not cells:
        return [f"## {c.name}{note}", "", "Not run yet.", ""]
    present = [m for m in methods if any(k[0] == m for k in cells)]
    seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in cells.values())
    lines = [f"## {c.name}{note}", "", f"{len(cells)} cells, {seconds / 60:.0f} min of training and judging "
             "(one torch thread each).", ""]
    for family in families:
        lines += [f"{FAMILY_TITLES[family]} (mean over seeds, 95% t-interval):", "",
                  condition_table(summary, c.name, present, measures, family), ""]
    if "dpo" in present:
        lines += [win_rates(cells, present), ""]
    if teacher_set is not None and "oracle_chosen" in next(read_rows(str(teacher_set["val"])))[1] \
            and all(k in next(read_rows(val_data))[1] for k in GOLD_COLUMNS):
        lines += ["Ranking accuracy on the validation pairs by quintile of |gold margin| (mean over seeds):", "",
                  margin_bins(cells, val_data, teacher_set["val"]), ""]
    return lines


def write_report(results, methods: list[str], conditions: list[Condition], teacher_sets: dict[str, dict],
                 val_data: str, root: Path, measures: list[str], temperatures: Sequence[float], views: Sequence[str],
                 reference: dict[str, dict] | None, frontiers: Frontiers | None = None) -> str:
    """``protocol.md`` (with ``frontiers``, the verdict and the gold reward at equal KL first; the
    teachers, the chosen settings, then each of ``views``), ``teachers.md``, ``cells.csv``,
    ``summary.csv``, ``frontier.png`` and ``across.png`` (and :meth:`frontier.Frontiers.write`'s files),
    from the finished cells; a condition without any is listed as not run yet. ``reference``: the
    starting policy's scores."""
    rows = cell_rows(results, temperatures, {c.name: teacher_margins(teacher_sets.get(c.teacher_key()))
                                             for c in conditions})
    summary = summarize(rows)
    families = [f for f in (IN_DISTRIBUTION, OUT_OF_DISTRIBUTION) if any(k[2] == f for k in summary)]
    correlations = any(k[2] == PAIRS for k in summary)
    start = {k: s["mean"] for k, s in (reference or {}).get(IN_DISTRIBUTION, {}).items()}
    lines = frontiers.sections(summary, [c.name for c in conditions]) if frontiers else []
    if any("validation" in t for t in teacher_sets.values()):
        lines += ["## Teachers", "", teacher_table(teacher_sets), ""]
    if (root / "chosen.json").is_file():
        chosen = json.loads((root / "chosen.json").read_text())
        lines += ["Settings chosen on the tuning condition (`tuning.md`): "
                  + "; ".join(f"{m}: {setting_name(s)}" for m, s in chosen.items()), ""]
    if start:
        lines += ["Starting policy on the evaluation prompts: " + ", ".join(f"{label(m)} {v:+.3f}" for m, v in start.items()), ""]
    for view in views:
        if view == "conditions":
            for c in conditions:
                lines += _condition_section(c, results.get(c.name, {}), methods, summary, measures, families,
                                            None if c.teacher == GIVEN else teacher_sets.get(c.teacher_key()), val_data)
        elif view == "across":
            lines += ["## Across conditions", ""]
            for family in families:
                for m in measures:
                    lines += [f"### {label(m)}: {FAMILY_TITLES[family].lower()} (mean over seeds, 95% t-interval)", "",
                              across_table(summary, conditions, methods, m, family), ""]
            if correlations:
                lines += [f"### {label(CORRELATION)} (mean over seeds, 95% t-interval)", "",
                          across_table(summary, conditions, methods, CORRELATION, PAIRS), ""]
        elif view == "temperatures":
            lines += ["## By temperature", ""]
            for family, m in [(f, m) for f in families for m in measures] + ([(PAIRS, CORRELATION)] if correlations else []):
                where = "" if family == PAIRS else f": {FAMILY_TITLES[family].lower()}"
                lines += [f"### {label(m)}{where} (mean over seeds, 95% t-interval)", "",
                          temperature_table(summary, conditions, methods, m, family, temperatures), ""]
        elif view == "splits":
            table1 = splits_table(summary, conditions, methods)
            if table1:
                lines += ["## The splits side by side", "",
                          f"{label('gold')} on the evaluation prompts (mean over seeds, 95% t-interval; seeds):", "",
                          table1, ""]
    write_csv(rows, root / "cells.csv")
    write_csv(list(summary.values()), root / "summary.csv")
    frontier_plot(results, methods, root / "frontier.png")
    if frontiers:
        frontiers.write(root, summary, [c.name for c in conditions])
    across_plot(summary, conditions, methods, [m for m in measures if m != KL], start, root / "across.png")
    text = "\n".join(lines).rstrip()
    (root / "teachers.md").write_text(teacher_table(teacher_sets) + "\n")
    (root / "protocol.md").write_text(text + "\n")
    return text
