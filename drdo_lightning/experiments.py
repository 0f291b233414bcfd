"""Experiments as commands: robustness to label noise, loss ablations, non-deterministic splits.

- ``robustness``: train every method at every label-flip rate with several seeds and the same
  budget; judge each policy by the gold reward and the (clean) Oracle; plot reward vs flip rate.
- ``ablations``: DRDO variants (``configs/ablations/*.yaml``: gamma, alpha, one loss term only,
  length-normalised log-probs, the preference term's form, balanced terms) against the paper's
  settings, same protocol.
- ``splits``: the paper's D_hc,he / D_lc,le splits of a preference dataset (Table 5).

Training goes through the recipes (:func:`training.run_fit`), evaluation through
:mod:`evaluation`. Intervals across seeds are Student-t 95% intervals of the per-seed means.
Sweeps resume: a finished cell (``scores.json``) or a finished set of judges is not redone.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from drdo_lightning.data import load_tokenizer, read_rows
from drdo_lightning.errors import DataError, MissingPathError, UserError, require_pretrained
from drdo_lightning.evaluation import (
    GOLD, PAPER_TEMPERATURES, Estimate, Judge, distinct_n, load_judge, new_figure, read_prompts, sample_and_score,
)
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.modules import ReferenceModule
from drdo_lightning.pipeline import EMBEDDED, STUDENTS, DataSpec, oracle_accuracy, scored_files, train_judges_and_score
from drdo_lightning.recipes import config_path, recipe_names, recipe_objective
from drdo_lightning.training import run_fit

log = logging.getLogger(__name__)

FLIP_RATES = (0.0, 0.1, 0.2, 0.3, 0.4)
SEEDS = (0, 1, 2)
# The noisy subset is the same for every seed at a rate (``--data.seed``), so the judges retrained
# on it serve all seeds; seeds vary the training itself (data order, reward-head init).
FLIP_SEED = 0
DISTINCT = "distinct_2"  # reported next to the judges' rewards: the diversity of the generations


# ---------------------------------------------------------------------------------------
# Shared pieces: evaluation settings, one cell, intervals over seeds


@dataclass
class EvalSettings:
    """How every trained policy of a sweep is judged (see :func:`evaluation.sample_and_score`).

    The defaults fit the embedded default: its responses are at most ~35 tokens.
    ``max_prompt_length`` and ``max_length`` are the token budgets of the whole sweep: training,
    scoring and judging.
    """

    prompts: str = str(EMBEDDED / "data" / "eval.jsonl")
    num_prompts: int | None = None
    judges: dict[str, str] = field(default_factory=lambda: {"gold": GOLD, "oracle": str(EMBEDDED / "oracle")})
    temperatures: list[float] = field(default_factory=lambda: list(PAPER_TEMPERATURES))
    top_p: float = 0.8
    max_new_tokens: int = 48
    max_prompt_length: int = 64
    max_length: int = 128
    batch_size: int = 50
    seed: int = 0

    def data_spec(self) -> DataSpec:
        return DataSpec(max_prompt_length=self.max_prompt_length, max_length=self.max_length)


class Evaluator:
    """Loads the prompts and judges of :class:`EvalSettings` once and scores policies with them."""

    def __init__(self, settings: EvalSettings) -> None:
        self.settings = settings
        self.prompts = read_prompts(settings.prompts, limit=settings.num_prompts)
        self.judges: dict[str, Judge] = {
            name: load_judge(spec, batch_size=settings.batch_size, max_prompt_length=settings.max_prompt_length,
                             max_length=settings.max_length)
            for name, spec in settings.judges.items()
        }

    def __call__(self, policy: Path) -> dict[str, dict[str, Any]]:
        """Mean reward per judge, over all prompts and temperatures and per temperature; and the
        generations' diversity (``distinct_2``, :func:`evaluation.distinct_n`), per temperature and its mean."""
        s = self.settings
        records, scores = sample_and_score(
            {"policy": str(policy)}, self.prompts, self.judges, temperatures=s.temperatures, top_p=s.top_p,
            max_new_tokens=s.max_new_tokens, max_prompt_length=s.max_prompt_length, batch_size=s.batch_size, seed=s.seed,
        )
        measures = {judge: {"mean": float(by_policy["policy"].mean()),
                            "by_temperature": by_policy["policy"].mean(axis=0).tolist()}
                    for judge, by_policy in scores.items()}
        distinct = [distinct_n([r["response"] for r in records if r["temperature"] == t]) for t in s.temperatures]
        measures[DISTINCT] = {"mean": statistics.fmean(distinct), "by_temperature": distinct}
        return measures


def run_cell(root: Path, evaluator: Evaluator | None, configs: list[str] | None, overrides: dict[str, Any] | None = None,
              policy: str | None = None) -> dict[str, Any]:
    """Train ``configs`` with ``overrides`` into ``root`` (or take ``policy`` as is) and evaluate the result.

    A finished cell (``root/scores.json``) is read back (``evaluator`` may then be None); an
    unfinished one is wiped and redone, so a resumed sweep never mixes two runs' logs.
    """
    done = root / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = time.perf_counter()
    export = run_fit(configs, overrides, run_dir=root).export_dir if configs is not None else Path(policy)
    trained = time.perf_counter()
    result = {"scores": evaluator(export), "train_seconds": trained - start, "eval_seconds": time.perf_counter() - trained}
    done.write_text(json.dumps(result, indent=1))
    return result


# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..10.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def seed_interval(values: Sequence[float]) -> Estimate:
    """Mean over seeds with a 95% Student-t interval, mean ± t_{0.975, n-1} · s / sqrt(n).

    One seed gives no interval (NaN bounds). For more than 11 seeds the quantile comes from the
    Cornish-Fisher expansion around the normal quantile, to third order (error below 1e-3).
    """
    mean = statistics.fmean(values)
    n = len(values)
    if n < 2:
        return Estimate(mean, math.nan, math.nan)
    df = n - 1
    z = statistics.NormalDist().inv_cdf(0.975)
    if df <= len(_T975):
        t = _T975[df - 1]
    else:
        t = (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
             + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))
    half = t * statistics.stdev(values) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half)


def aggregate(cells: list[dict], group: Sequence[str]) -> list[dict]:
    """Per ``group`` values and judge: the mean reward over seeds with its 95% t-interval."""
    by_key: dict[tuple, list[float]] = defaultdict(list)
    for cell in cells:
        by_key[tuple(cell[k] for k in group) + (cell["judge"],)].append(cell["reward"])
    return [{**dict(zip((*group, "judge"), key)), "seeds": len(rewards), **seed_interval(rewards)._asdict()}
            for key, rewards in by_key.items()]


def measure_label(name: str) -> str:
    """What a column of a sweep's tables measures: a judge's reward, or the generations' diversity."""
    return "distinct-2 of the generations" if name == DISTINCT else f"{name} reward"


def _cells(result: dict, **labels) -> list[dict]:
    return [{**labels, "judge": judge, "reward": s["mean"]} for judge, s in result["scores"].items()]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cell_text(row: dict | None) -> str:
    if row is None:
        return "-"
    if math.isnan(row["low"]):
        return f"{row['value']:+.3f}"
    return f"{row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


# ---------------------------------------------------------------------------------------
# Robustness to label noise


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
                cells += _cells(result, flip_rate=rate, method=method, seed=seed)
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


# ---------------------------------------------------------------------------------------
# Ablations of the DRDO loss


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
    start = run_cell(root / "start", evaluator, configs=None, policy=policy)
    cells = []
    for name, config in chosen.items():
        configs = ["drdo"] + ([str(config)] if config is not None else [])
        for seed in seeds:
            settings = {"seed_everything": seed, "trainer.max_steps": max_steps, "trainer.limit_val_batches": 0,
                        "model.model": policy, **evaluation.data_spec().fit_overrides(), **(overrides or {})}
            result = run_cell(root / name / f"seed_{seed}", evaluator, configs, settings)
            cells += _cells(result, variant=name, seed=seed)
    write_csv(cells, root / "cells.csv")
    summary = aggregate(cells, ("variant",))
    write_csv(summary, root / "ablations.csv")
    judges = [*evaluation.judges, DISTINCT]
    reference = {judge: s["mean"] for judge, s in start["scores"].items()}
    _plot_ablations(summary, list(chosen), judges, reference, root / "ablations.png")
    lines = ["Mean reward over seeds (95% t-interval); `drdo` = paper settings (alpha 0.1, gamma 2).", "",
             "| variant | " + " | ".join(judges) + " |", "|---" * (len(judges) + 1) + "|",
             "| start (SFT) | " + " | ".join(f"{reference[j]:+.3f}" for j in judges) + " |"]
    for name in chosen:
        row = [cell_text(next((s for s in summary if s["variant"] == name and s["judge"] == j), None)) for j in judges]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
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


# ---------------------------------------------------------------------------------------
# Non-deterministic splits (paper Table 5)


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, token in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token != other)))
        previous = current
    return previous[-1]


def normalized_edit_distance(a: Sequence, b: Sequence) -> float:
    """Edit distance divided by the longer length: 0 for equal sequences, 1 for nothing in common."""
    return edit_distance(a, b) / max(len(a), len(b), 1)


def _field(row: dict, dotted: str) -> Any:
    """``row["extra"]["confidence"]`` for ``"extra.confidence"``; None where a part is missing."""
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _tldr_prompt(info: dict) -> str:
    """The TL;DR prompt of an OpenAI comparison's ``info`` (a Reddit post, or a CNN/DM article)."""
    if info.get("post") is not None:
        return f"SUBREDDIT: r/{info.get('subreddit')}\nTITLE: {info.get('title')}\nPOST: {info['post']}\nTL;DR:"
    return f"ARTICLE: {info['article']}\nTL;DR:"


def read_comparisons(
    data: str, *, split: str = "train", prompt_column: str = "prompt", chosen_column: str = "chosen",
    rejected_column: str = "rejected", confidence_column: str | None = None,
) -> list[dict]:
    """``{prompt, chosen, rejected, confidence}`` rows from preference data with a confidence value.

    Two layouts, told apart per row: OpenAI's summarize-from-feedback ``comparisons`` (``info``,
    ``summaries``, ``choice``; confidence in ``extra.confidence``) and flat pairs with a
    confidence column. ``confidence_column`` may be dotted for nested fields; default
    ``extra.confidence`` for comparisons, ``confidence`` for pairs. Rows without a confidence
    are skipped and counted.
    """
    rows, skipped = [], 0
    for number, row in read_rows(data, split):
        if "summaries" in row and "choice" in row:
            texts = [s["text"] for s in row["summaries"]]
            pair = {"prompt": _tldr_prompt(row["info"]), "chosen": texts[row["choice"]], "rejected": texts[1 - row["choice"]]}
            confidence = _field(row, confidence_column or "extra.confidence")
        else:
            pair = {"prompt": row.get(prompt_column), "chosen": row.get(chosen_column), "rejected": row.get(rejected_column)}
            confidence = _field(row, confidence_column or "confidence")
            if not all(isinstance(v, str) for v in pair.values()):
                raise DataError(f"{data}: row {number}: need text in {prompt_column!r}, {chosen_column!r}, {rejected_column!r}")
        if confidence is None:
            skipped += 1
            continue
        rows.append({**pair, "confidence": float(confidence)})
    if skipped:
        log.warning("%s: skipped %d rows without a confidence value", data, skipped)
    if not rows:
        raise DataError(f"{data}: no rows with a confidence value", setting="confidence_column",
                        advice="name the confidence field with {option}")
    return rows


def splits(
    data: str,
    out: str = "runs/splits",
    split: str = "train",
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    confidence_column: str | None = None,
    tokenizer: str | None = None,
) -> dict[str, dict[str, float]]:
    """Split preference pairs into D_hc,he (easy) and D_lc,le (hard), as the paper's Table 5.

    The split is at the 50th percentiles of labeler confidence and of the normalised token edit
    distance between chosen and rejected.

    A pair is *high* on a measure when it lies strictly above that measure's median and *low*
    when strictly below; pairs at a median belong to neither (with integer confidences many
    do). D_hc,he holds pairs high on both (confident labels, clearly different responses: "easy"),
    D_lc,le pairs low on both ("hard", near-ties). Writes ``all.jsonl``, ``hc_he.jsonl``,
    ``lc_le.jsonl`` (prompt, chosen, rejected, confidence, edit_distance: trainable with the data
    module) and ``splits.md`` / ``splits.json`` with sizes, means and the medians.

    Args:
        data: OpenAI ``comparisons`` rows (e.g. the TL;DR comparisons JSON lines) or any
            preference pairs with a confidence column (see :func:`read_comparisons`).
        tokenizer: Tokenizer for the edit distance (path or hub id); default: whitespace words.
    """
    rows = read_comparisons(data, split=split, prompt_column=prompt_column, chosen_column=chosen_column,
                            rejected_column=rejected_column, confidence_column=confidence_column)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None

    def tokens(texts: list[str]) -> list[list]:
        return [t.split() for t in texts] if tok is None else tok(texts, add_special_tokens=False)["input_ids"]

    chosen, rejected = tokens([r["chosen"] for r in rows]), tokens([r["rejected"] for r in rows])
    for row, a, b in tqdm(zip(rows, chosen, rejected), total=len(rows), desc="edit distance", unit="pair"):
        row["edit_distance"] = normalized_edit_distance(a, b)
    confidence = np.array([r["confidence"] for r in rows])
    distance = np.array([r["edit_distance"] for r in rows])
    medians = {"confidence": float(np.percentile(confidence, 50)), "edit_distance": float(np.percentile(distance, 50))}
    members = {
        "all": np.ones(len(rows), dtype=bool),
        "hc_he": (confidence > medians["confidence"]) & (distance > medians["edit_distance"]),
        "lc_le": (confidence < medians["confidence"]) & (distance < medians["edit_distance"]),
    }
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, mask in members.items():
        chosen_rows = [r for r, keep in zip(rows, mask) if keep]
        write_jsonl(root / f"{name}.jsonl", chosen_rows)
        report[name] = {"size": len(chosen_rows),
                        "mean_confidence": float(confidence[mask].mean()) if mask.any() else math.nan,
                        "mean_edit_distance": float(distance[mask].mean()) if mask.any() else math.nan}
    (root / "splits.json").write_text(json.dumps({"medians": medians, "splits": report}, indent=1))
    table = "\n".join(
        [f"Medians: confidence {medians['confidence']:g}, normalised edit distance {medians['edit_distance']:.3f}", "",
         "| split | size | mean confidence | mean edit distance |", "|---|---|---|---|"]
        + [f"| {name} | {r['size']} | {r['mean_confidence']:.3f} | {r['mean_edit_distance']:.3f} |" for name, r in report.items()]
    )
    (root / "splits.md").write_text(table + "\n")
    print(table)
    return report
