"""A tuned, fair comparison of the methods: settings chosen on held-out prompts, then noise x seeds.

``compare`` runs the whole protocol as one resumable command:

1. **Judges.** The Oracle starts from its own SFT policy, larger than the students
   (:data:`task.ORACLE_SHAPE`, as the paper's Oracle is as large as its students or larger); the
   e-DPO ensemble starts from the students' SFT policy. At every flip rate both are retrained on
   that rate's noisy labels and rescore the pairs (:func:`experiments.noisy_judges`).
2. **Tuning at flip 0.** Every method trains at every learning rate and every value of its main
   knob (DPO beta, IPO tau, e-DPO beta; DRDO alpha and the form of its loss, ``variant``) with
   one seed, and is judged by the gold reward on *tuning prompts*: prompts of the validation pairs,
   none of them an evaluation prompt. The best mean gold reward wins; where a method's best
   learning rate is the grid's largest or smallest, its grid grows one step past that edge on the
   1-3-10 ladder (every knob value at the new rate) until the choice is interior or
   ``max_grid_extensions`` steps were added (:func:`beyond_edge`). DRDO must also still
   distil: a DRDO setting qualifies only if its student/Oracle reward-margin correlation on the
   validation pairs is within ``distill_tolerance`` of the paper form's at the same learning rate
   and alpha.
3. **Evaluation.** The chosen settings train at every flip rate with every seed and are judged on
   the evaluation prompts by the gold reward and the clean-label Oracle, per temperature and
   pooled, with 95% Student-t intervals over seeds, next to the generations' distinct-2.

Runs go to ``jobs`` worker processes with ``threads`` torch threads each (1 x 2 on a 2-core
machine). A finished cell (``scores.json``) or judge set is never redone, so an interrupted
command picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from drdo_lightning.data.readers import read_rows
from drdo_lightning.data.tokenization import load_tokenizer
from drdo_lightning.embedded_default import EMBEDDED, task
from drdo_lightning.errors import UserError, require_pretrained
from drdo_lightning.experiments.sweeps import (
    DISTINCT,
    FLIP_SEED,
    STUDENTS,
    EvalSettings,
    Evaluator,
    aggregate,
    beyond_edge,
    executor,
    cell_text,
    measure_label,
    noisy_judges,
    plot_against_flip_rate,
    run_cell,
    tuning_prompts,
)
from drdo_lightning.recipes import config_path
from drdo_lightning.reports import markdown_table, write_csv
from drdo_lightning.scoring import score
from drdo_lightning.stages import oracle_accuracy, train_sft
from drdo_lightning.training import DataSpec, RunSpec

LEARNING_RATES = (1e-4, 3e-4, 1e-3)
PAPER_FORM = "paper"  # the ``variant`` value that adds no ablation layer: Eq. 6 as printed
VARIANT = "variant"  # grid key naming a layer under configs/ablations/ instead of a config key
# The main knob of each method; every other setting is the recipe's.
TUNING_GRID: dict[str, dict[str, list]] = {
    "dpo": {"model.beta": [0.05, 0.1, 0.5]},
    "ipo": {"model.tau": [0.05, 0.1, 0.5]},
    "edpo": {"model.beta": [0.05, 0.1, 0.5]},
    "cdpo": {"model.label_smoothing": [0.05, 0.1, 0.2]},
    "rdpo": {"model.flip_rate": [0.05, 0.1, 0.2]},
    "rpo": {"model.nll_weight": [0.1, 0.5, 1.0]},
    "simpo": {"model.gamma": [0.5, 1.0, 2.0]},
    "orpo": {"model.odds_ratio_weight": [0.05, 0.1, 0.5]},
    "drdo": {VARIANT: [PAPER_FORM, "corrected", "token_unlikelihood", "balance_terms_token_unlikelihood"],
             "model.alpha": [0.1, 1.0]},
}
CORRELATION = "reward_corr"  # DRDO's student/Oracle reward-margin correlation, reported like a judge


# ---------------------------------------------------------------------------------------
# Worker processes: each loads the judges once and trains and evaluates one cell at a time


_evaluators: dict[str, Evaluator] = {}


def _evaluator(settings: EvalSettings) -> Evaluator:
    key = repr(settings)
    if key not in _evaluators:
        _evaluators[key] = Evaluator(settings)
    return _evaluators[key]


def _cell(root: Path, settings: EvalSettings, run: RunSpec | None, policy: str | None = None,
          teacher_pairs: str | None = None, spec: DataSpec | None = None) -> dict:
    """:func:`sweeps.run_cell`, plus the student/teacher reward-margin correlation on ``teacher_pairs``."""
    finished = (root / "scores.json").is_file()  # read back without loading the judges
    result = run_cell(root, None if finished else _evaluator(settings), run, policy)
    if teacher_pairs is not None and CORRELATION not in result["scores"]:
        corr = margin_correlation(root / "export", teacher_pairs, root / "student_scores.jsonl", spec or DataSpec())
        result["scores"][CORRELATION] = {"mean": corr, "by_temperature": []}
        (root / "scores.json").write_text(json.dumps(result, indent=1))
    return result


def _judges(work: Path, train_data: str, val_data: str, policy: str, oracle_policy: str, members: int,
            shared: RunSpec) -> dict[str, str]:
    scored = noisy_judges(work, train_data, val_data, policy, members, shared, oracle_policy=oracle_policy)
    return {split: str(path) for split, path in scored.items()}


def _oracle_policy(root: Path, tokenizer_source: str, shape: dict[str, int], sft_data: str, val_data: str,
                   spec: DataSpec, overrides: dict[str, Any]) -> str:
    """The Oracle's SFT policy: a randomly initialised Llama of ``shape`` (:data:`task.ORACLE_SHAPE`),
    fine-tuned by the ``sft`` recipe, as ``build-embedded-default`` makes the shipped Oracle's."""
    base = root / "base_model"
    if not (base / "config.json").is_file():
        task.write_base_model(base, load_tokenizer(tokenizer_source), seed=FLIP_SEED, **shape)
    return str(train_sft(RunSpec("sft", run_dir=root / "sft", model=base, train_file=sft_data, val_file=val_data, data=spec,
                                 seed=FLIP_SEED, overrides=overrides)))


# ---------------------------------------------------------------------------------------
# Measures


def margin_correlation(student: Path, teacher_pairs: str, scores_file: Path, spec: DataSpec) -> float:
    """Pearson correlation of the student's reward margin r(x, y_w) - r(x, y_l) with the teacher's
    (``oracle_chosen - oracle_rejected`` of ``teacher_pairs``): how well the student distils."""
    score([str(student)], teacher_pairs, str(scores_file), output_prefix="student_", overwrite=True,
          **spec.score_options())
    rows = [row for _, row in read_rows(str(scores_file))]
    student_margin = [r["student_chosen"] - r["student_rejected"] for r in rows]
    teacher_margin = [r["oracle_chosen"] - r["oracle_rejected"] for r in rows]
    return float(np.corrcoef(student_margin, teacher_margin)[0, 1])


def _cells(result: dict, temperatures: list[float], **labels) -> list[dict]:
    """One row per measure and temperature (``all``: pooled over temperatures)."""
    rows = []
    for measure, s in result["scores"].items():
        rows.append({**labels, "temperature": "all", "judge": measure, "reward": s["mean"]})
        rows += [{**labels, "temperature": str(t), "judge": measure, "reward": v}
                 for t, v in zip(temperatures, s["by_temperature"])]
    return rows


# ---------------------------------------------------------------------------------------
# The grid


def settings_of(method: str, grid: dict[str, list], learning_rates: list[float]) -> list[dict[str, Any]]:
    """Every combination of a learning rate and the grid's knob values, as ``{key: value}`` dicts."""
    combos: list[dict[str, Any]] = [{"model.learning_rate": lr} for lr in learning_rates]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def setting_name(setting: dict[str, Any]) -> str:
    return ",".join(f"{k.removeprefix('model.')}={v}" for k, v in setting.items())


def _layers_and_knobs(method: str, setting: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A grid setting as the recipe layers it names (an ablation variant) and the options it sets."""
    knobs = {k: v for k, v in setting.items() if k != VARIANT}
    variant = setting.get(VARIANT, PAPER_FORM)
    return (method,) + ((str(config_path(f"ablations/{variant}")),) if variant != PAPER_FORM else ()), knobs


def choose(method: str, tuned: list[dict], tolerance: float) -> dict:
    """The tuned setting with the highest gold reward; for DRDO among those that still distil
    (correlation at least the paper form's at the same learning rate and alpha minus ``tolerance``)."""
    candidates = tuned
    if method == "drdo":
        def paper(entry: dict) -> dict:
            return next(e for e in tuned if e["setting"].get(VARIANT) == PAPER_FORM and all(
                e["setting"][k] == v for k, v in entry["setting"].items() if k != VARIANT))

        candidates = [e for e in tuned if e[CORRELATION] >= paper(e)[CORRELATION] - tolerance]
    return max(candidates, key=lambda e: e["gold"])


# ---------------------------------------------------------------------------------------
# The command


def compare(
    out: str = "runs/compare",
    methods: list[str] = list(STUDENTS),
    learning_rates: list[float] = list(LEARNING_RATES),
    grid: dict[str, dict[str, list]] = TUNING_GRID,
    flip_rates: list[float] = [0.0, 0.2, 0.4],
    seeds: list[int] = [0, 1, 2, 3, 4],
    tuning_seed: int = 0,
    num_tuning_prompts: int = 200,
    distill_tolerance: float = 0.1,
    max_steps: int = 150,
    judge_steps: int = 125,
    max_grid_extensions: int = 2,
    members: int = 3,
    policy: str = str(EMBEDDED / "sft_policy"),
    sft_data: str = str(EMBEDDED / "data" / "sft.jsonl"),
    train_data: str = str(EMBEDDED / "data" / "train.jsonl"),
    val_data: str = str(EMBEDDED / "data" / "val.jsonl"),
    oracle_shape: dict[str, int] = dict(task.ORACLE_SHAPE),
    evaluation: EvalSettings = EvalSettings(),
    jobs: int = 2,
    threads: int = 1,
    overrides: dict[str, Any] | None = None,
) -> str:
    """Tune every method on held-out prompts at flip 0, then run the chosen ones at each flip rate and seed.

    The protocol is the module docstring's. Writes under ``out``: ``tuning.md``/``.csv``
    (every tuned setting), ``cells.csv``, ``comparison.csv`` and ``comparison.md`` (means over
    seeds with 95% t-intervals, per temperature and pooled), ``comparison.png`` (pooled means against
    the flip rate) and ``timing.json``.

    Args:
        methods: Student recipes to compare.
        learning_rates: Learning rates every method is tuned over.
        grid: Per method, config keys (or ``variant``: a layer under ``configs/ablations/``, or
            ``paper``) and the values tuned over.
        flip_rates: Label-flip rates of the evaluation; the judges are retrained at each.
        seeds: Training seeds of the evaluation.
        tuning_seed: The seed every tuning run uses.
        num_tuning_prompts: How many prompts of ``val_data`` (none of them an evaluation prompt) judge the tuning.
        distill_tolerance: How far below the paper form's correlation a DRDO setting may distil.
        max_steps: Optimiser steps of every student.
        judge_steps: Optimiser steps of the Oracle and of each ensemble member.
        max_grid_extensions: How many learning rates a method's grid may grow past its edge
            (:func:`beyond_edge`) while its chosen rate sits there; 0 keeps ``learning_rates`` as given.
        members: e-DPO ensemble size.
        policy: The students' SFT policy; its tokenizer builds the Oracle's base model.
        sft_data: The SFT data the Oracle's larger SFT policy trains on.
        oracle_shape: The Oracle's Llama shape (config fields over the students' tiny Llama).
        train_data, val_data: Preference pairs (clean labels).
        evaluation: How the final policies are judged (prompts, judges, temperatures, budgets).
        jobs: Runs at a time, each in its own process.
        threads: Torch threads per run.
        overrides: Dotted config keys for every training run, e.g. ``{"data.cache_dir": "/tmp/c"}``.
    """
    require_pretrained(policy, "policy")
    unknown = [m for m in methods if m not in grid]
    if unknown:
        raise UserError(f"--methods: no tuning grid for {unknown}; --grid has {sorted(grid)}")
    if "gold" not in evaluation.judges:
        raise UserError(f"--evaluation.judges: the tuning chooses by the judge named 'gold'; got {sorted(evaluation.judges)}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    spec = evaluation.data_spec()
    tuning = EvalSettings(**{**vars(evaluation), "prompts": str(tuning_prompts(
        val_data, evaluation.prompts, root / "tuning_prompts.jsonl", num_tuning_prompts)), "num_prompts": None})

    with executor(jobs, threads) as pool:
        oracle_policy = pool.submit(_oracle_policy, root / "oracle_policy", policy, oracle_shape, sft_data, val_data,
                                    spec, overrides or {})
        starts = {name: pool.submit(_cell, root / "start" / name, s, None, policy=policy)
                  for name, s in (("tuning", tuning), ("evaluation", evaluation))}
        oracle_policy = oracle_policy.result()
        judges: dict[float, Future] = {}
        shared = {rate: RunSpec("oracle", model=policy, data=spec, label_flip_rate=rate, flip_seed=FLIP_SEED,
                                validate=False, overrides=overrides or {})
                  for rate in dict.fromkeys([0.0, *flip_rates])}
        judges: dict[float, Future] = {
            rate: pool.submit(_judges, root / f"flip_{rate}" / "judges", train_data, val_data, policy, oracle_policy,
                              members, replace(run, max_steps=judge_steps))
            for rate, run in shared.items()
        }

        def student(rate: float, seed: int, method: str, setting: dict[str, Any], run_dir: Path,
                    how: EvalSettings) -> Future:
            data = judges[rate].result()
            layers, knobs = _layers_and_knobs(method, setting)
            quiet = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
            run = replace(shared[rate], recipe=layers, seed=seed, train_file=data["train"], val_file=data["val"],
                          max_steps=max_steps, one_model_in_memory=True, overrides={**quiet, **(overrides or {}), **knobs})
            return pool.submit(_cell, run_dir, how, run, teacher_pairs=data["val"] if method == "drdo" else None, spec=spec)

        def tune(m: str, rates: list[float]) -> list[tuple[dict, Future]]:
            return [(s, student(0.0, tuning_seed, m, s, root / "tuning" / m / setting_name(s), tuning))
                    for s in settings_of(m, grid[m], rates)]

        rates = {m: list(learning_rates) for m in methods}
        runs = {m: tune(m, rates[m]) for m in methods}
        for extension in range(max_grid_extensions + 1):
            tuned = [{"method": m, "setting": s, **{k: v["mean"] for k, v in f.result()["scores"].items()}}
                     for m in methods for s, f in runs[m]]
            chosen = {m: choose(m, [t for t in tuned if t["method"] == m], distill_tolerance)["setting"] for m in methods}
            beyond = {m: beyond_edge(chosen[m]["model.learning_rate"], rates[m]) for m in methods}
            beyond = {m: lr for m, lr in beyond.items() if lr is not None}
            if not beyond or extension == max_grid_extensions:
                break
            for m, lr in beyond.items():
                rates[m].append(lr)
                runs[m] += tune(m, [lr])
        final = [(rate, seed, m, student(rate, seed, m, chosen[m], root / f"flip_{rate}" / f"seed_{seed}" / m, evaluation))
                 for rate in flip_rates for seed in seeds for m in methods]
        cells = [c for rate, seed, m, f in final
                 for c in _cells(f.result(), evaluation.temperatures, flip_rate=rate, method=m, seed=seed)]
        reference = {name: f.result()["scores"] for name, f in starts.items()}
        accuracy = {rate: oracle_accuracy(Path(judges[rate].result()["val"])) for rate in flip_rates}

    write_csv([{"method": t["method"], "setting": setting_name(t["setting"]),
                **{k: v for k, v in t.items() if k not in ("method", "setting")}} for t in tuned], root / "tuning.csv")
    tuning_table = _tuning_table(tuned, chosen, reference["tuning"], rates)
    (root / "tuning.md").write_text(tuning_table + "\n")
    write_csv(cells, root / "cells.csv")
    summary = aggregate(cells, ("flip_rate", "method", "temperature"))
    write_csv(summary, root / "comparison.csv")
    table = _comparison_table(summary, methods, flip_rates, [*evaluation.judges, DISTINCT],
                              evaluation.temperatures, reference["evaluation"], chosen, accuracy)
    (root / "comparison.md").write_text(table + "\n")
    pooled = [s for s in summary if s["temperature"] == "all"]
    start = {k: s["mean"] for k, s in reference["evaluation"].items()}
    plot_against_flip_rate(pooled, methods, [*evaluation.judges, DISTINCT], start, root / "comparison.png")
    (root / "timing.json").write_text(json.dumps({"seconds_this_invocation": time.perf_counter() - began,
                                                  "jobs": jobs, "threads": threads}))
    print(tuning_table + "\n\n" + table)
    return table


def _tuning_table(tuned: list[dict], chosen: dict[str, dict], start: dict[str, dict], rates: dict[str, list[float]]) -> str:
    measures = list(dict.fromkeys(["gold", *(k for t in tuned for k in t if k not in ("method", "setting"))]))
    body = []
    for t in tuned:
        name = setting_name(t["setting"])
        if t["setting"] == chosen.get(t["method"]):
            name = f"**{name}**"
        body.append([t["method"], name, *(f"{t[m]:+.3f}" if m in t and not math.isnan(t[m]) else "-" for m in measures)])
    header = ["method", "setting", *(m if m != CORRELATION else "margin corr." for m in measures)]
    grids = "; ".join(
        f"{m}: {', '.join(f'{lr:g}' for lr in sorted(lrs))}"
        + (" (chosen at an edge)" if beyond_edge(chosen[m]["model.learning_rate"], lrs) is not None else "")
        for m, lrs in rates.items())
    return "\n".join(["Tuning at flip 0 (one seed), judged on the tuning prompts; **bold**: the chosen setting. "
                      "Starting policy: " + ", ".join(f"{m} {s['mean']:+.3f}" for m, s in start.items()), "",
                      f"Learning rates tried: {grids}.", "", markdown_table(header, body)])


def _comparison_table(summary, methods, flip_rates, measures, temperatures, start, chosen, accuracy) -> str:
    columns = ["all", *map(str, temperatures)]
    lines = ["Chosen settings: " + "; ".join(f"{m}: {setting_name(chosen[m])}" for m in methods), "",
             "Retrained Oracle's accuracy on the clean validation pairs: "
             + ", ".join(f"flip {r:g}: {a:.3f}" for r, a in accuracy.items())]
    for measure in [*measures, CORRELATION]:
        rows_present = [s for s in summary if s["judge"] == measure]
        if not rows_present:
            continue
        cols = ["all"] if measure == CORRELATION else columns
        label = "student/Oracle reward-margin correlation on the validation pairs" if measure == CORRELATION \
            else measure_label(measure)
        reference = f"; starting policy: {start[measure]['mean']:+.3f}" if measure in start else ""
        body = []
        for rate in flip_rates:
            for method in methods:
                cells = [cell_text(next((s for s in rows_present if s["flip_rate"] == rate and s["method"] == method
                                         and s["temperature"] == c), None)) for c in cols]
                if any(c != "-" for c in cells):
                    body.append([f"{rate:g}", method, *cells])
        header = ["flip", "method", *("pooled" if c == "all" else f"T = {c}" for c in cols)]
        lines += ["", f"### {label} (mean over seeds, 95% t-interval{reference})", "", markdown_table(header, body)]
    return "\n".join(lines)
