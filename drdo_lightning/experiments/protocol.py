"""The paper's regime on the embedded default: near-tie labels, teachers at their best, judges that repetition cannot game.

``protocol`` runs one resumable command over *conditions*: each says how the training labels are
made (a noise model of the data options, or an easy/hard split as the paper's Table 1) and which
teachers the students distil (trained on the condition's own pairs, or one set trained on all pairs).

1. **Teachers.** Per teacher set, the Oracle and the e-DPO ensemble train from the students' SFT
   policy with validation on a held-out 10% of their own training pairs, carrying the same label
   noise (no clean label reaches them), and export their best checkpoint
   (:func:`stages.train_judges_and_score`, ``selection="held_out"``). Their accuracy on that split
   and against the gold sign of the validation pairs is reported.
2. **Tuning.** On ``tuning_condition``, every method trains at every learning rate with one seed,
   judged by the gold reward on tuning prompts (validation prompts that are no evaluation prompt);
   a method whose best rate is the grid's edge gets the next rate past it
   (:func:`sweeps.beyond_edge`) until its choice is interior or ``max_grid_extensions`` were added.
3. **Evaluation.** Every method at its chosen rate, on every condition and seed (a condition may
   name fewer seeds: a secondary one), judged on the evaluation prompts and on the
   out-of-distribution prompts by the gold reward and the clean Oracle, with distinct-2 and
   KL(π || π_SFT) on the policy's own samples; and on the validation pairs binned by |gold margin|,
   the ranking accuracy of each model's margins (:mod:`evaluation.margins`). Conditions with the
   all-pairs teachers also train ``dpo_relabelled``: DPO on the pairs ordered by that Oracle, the
   control that separates DRDO's extra information from robustness.

Runs go to ``jobs`` worker processes of ``threads`` torch threads; the seeds run in order, so an
interrupted command has every method at the seeds it finished, and a finished cell or teacher set
is never redone.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from drdo_lightning.data.readers import read_rows
from drdo_lightning.data.splits import splits
from drdo_lightning.embedded_default import EMBEDDED, OOD_PROMPTS
from drdo_lightning.errors import UserError, require_pretrained
from drdo_lightning.evaluation.margins import pair_margins
from drdo_lightning.experiments.protocol_report import (
    IN_DISTRIBUTION,
    MARGINS,
    OUT_OF_DISTRIBUTION,
    tuning_table,
    write_report,
)
from drdo_lightning.experiments.sweeps import (
    DISTINCT,
    FLIP_SEED,
    EvalSettings,
    Evaluator,
    beyond_edge,
    executor,
    run_cell,
    tuning_prompts,
)
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.recipes import config_path
from drdo_lightning.stages import score_with_judges, train_judges_and_score
from drdo_lightning.training import RunSpec

log = logging.getLogger(__name__)

GOLD_COLUMNS = ["gold_chosen", "gold_rejected"]
OWN, ALL_PAIRS = "own", "all_pairs"  # the teacher arms of a condition
RELABELLED = "dpo_relabelled"  # DPO on the pairs ordered by the all-pairs Oracle (the control of that arm)


@dataclass(frozen=True)
class Condition:
    """How one condition's training labels are made, and whose teachers its students distil.

    Attributes:
        name: Folder and table name.
        data: Data options of the label-noise model, e.g. ``{"label_noise": "bt", "noise_temperature": 2.0,
            "noise_score_columns": ["gold_chosen", "gold_rejected"]}`` (docs/data.md, "Label noise").
        split: Train on one half of the paper's Table 1 instead of all pairs: ``easy`` (high confidence,
            high edit distance), ``hard`` (low, low) or ``sample`` (all pairs subsampled to the same size).
        teacher: ``own``: teachers trained on this condition's training pairs; ``all_pairs``: one set
            trained on every training pair with the data's own labels (the paper's setting for splits).
        seeds: How many of the command's seeds this condition runs (None: all); fewer marks it secondary.
    """

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    teacher: str = OWN
    seeds: int | None = None


def as_condition(fields: dict[str, Any] | Condition) -> Condition:
    """A :class:`Condition` from its fields, with an error naming what is unknown or missing."""
    if isinstance(fields, Condition):
        return fields
    known = set(Condition.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown or "name" not in fields:
        raise UserError(f"--conditions: {dict(fields)} has unknown fields {unknown} or no name; a condition has "
                        f"{sorted(known)}")
    return Condition(**fields)


def _bt(temperature: float) -> dict[str, Any]:
    return {"label_noise": "bt", "noise_temperature": temperature, "noise_score_columns": GOLD_COLUMNS}


# The paper-regime conditions first: near-ties resampled (Bradley-Terry below the data's own s = 5),
# flips on the smallest margins, Table 1's splits with both teacher arms; uniform flips as the stress test.
CONDITIONS: list[dict[str, Any]] = [
    {"name": "bt_s2", "data": _bt(2.0)},
    {"name": "bt_s1", "data": _bt(1.0)},
    {"name": "low_margin_0.2", "data": {"label_noise": "low_margin", "label_flip_rate": 0.2,
                                        "noise_score_columns": GOLD_COLUMNS}},
    *({"name": f"{split}_{arm}", "split": split, "teacher": arm} for split in ("hard", "easy", "sample")
      for arm in (ALL_PAIRS, OWN)),
    {"name": "uniform_0.2", "data": {"label_flip_rate": 0.2}, "seeds": 2},
]
# Each method's recipe layers (a layer under configs/ablations/ names a DRDO form).
METHODS: dict[str, list[str]] = {
    "drdo": ["drdo"], "drdo_token_ul": ["drdo", "ablations/token_unlikelihood"], "dpo": ["dpo"], "ipo": ["ipo"],
    "edpo": ["edpo"], "cdpo": ["cdpo"], "rdpo": ["rdpo"], "simpo": ["simpo"],
}
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
SPLIT_FILES = {"easy": "hc_he", "hard": "lc_le", "sample": "all"}


# ---------------------------------------------------------------------------------------
# Data of the conditions


def table1_splits(train_data: str, out: Path, seed: int = FLIP_SEED) -> dict[str, Path]:
    """The paper's Table 1 on pairs with gold scores: confidence |gold margin|, split at the medians of
    confidence and edit distance (:func:`data.splits.splits`), each half and a sample of all pairs cut
    to the smaller half's size (seeded), so the three differ in which pairs they hold, not how many."""
    files = {name: out / f"{name}.jsonl" for name in SPLIT_FILES}
    if all(f.is_file() for f in files.values()):
        return files
    rows = [row for _, row in read_rows(train_data)]
    missing = [c for c in GOLD_COLUMNS if c not in rows[0]]
    if missing:
        raise UserError(f"--train_data {train_data}: the splits need the gold score columns {missing}")
    write_jsonl(out / "with_confidence.jsonl",
                [{**row, "confidence": abs(row["gold_chosen"] - row["gold_rejected"])} for row in rows])
    splits(str(out / "with_confidence.jsonl"), out=str(out / "halves"))
    halves = {name: [row for _, row in read_rows(str(out / "halves" / f"{part}.jsonl"))]
              for name, part in SPLIT_FILES.items()}
    size = min(len(halves["easy"]), len(halves["hard"]))
    rng = np.random.default_rng(seed)
    for name, members in halves.items():
        keep = sorted(rng.choice(len(members), size=size, replace=False))
        write_jsonl(files[name], [members[i] for i in keep])
    log.info("Table 1 splits of %d pairs each in %s", size, out)
    return files


def relabelled_by_teacher(scored: Path, out: Path) -> Path:
    """``scored`` with each pair ordered by its Oracle's scores (chosen: the higher ``oracle_*``),
    every ``*_chosen``/``*_rejected`` column swapped with it; the count swapped is logged."""
    rows, swapped = [], 0
    for _, row in read_rows(str(scored)):
        if row["oracle_rejected"] > row["oracle_chosen"]:
            swapped += 1
            row = {**row, **{k.replace("rejected", "chosen") if "rejected" in k else k.replace("chosen", "rejected"): v
                             for k, v in row.items() if "chosen" in k or "rejected" in k}}
        rows.append(row)
    write_jsonl(out, rows)
    log.info("%s: %d of %d pairs reordered by the Oracle", out, swapped, len(rows))
    return out


# ---------------------------------------------------------------------------------------
# Teachers


def gold_accuracy(scored: Path, prefix: str = "oracle") -> float:
    """How often ``prefix``'s margin has the sign of the gold margin (pairs with a gold tie left out)."""
    pairs = [(r[f"{prefix}_chosen"] - r[f"{prefix}_rejected"], r["gold_chosen"] - r["gold_rejected"])
             for _, r in read_rows(str(scored))]
    return statistics.fmean((m > 0) == (g > 0) for m, g in pairs if g != 0)


def teachers(work: Path, train: str, val: str, policy: str, members: int, shared: RunSpec,
             all_pairs: str | None = None) -> dict[str, Any]:
    """The teacher set of one training file (trained unless ``work/teachers.json`` exists): the scored
    pairs (``train``, ``val``), the models (``oracle``, ``ensemble``) and their accuracies.

    ``all_pairs``: the file ``train`` is a subset of; its teachers then run as many more epochs as
    ``all_pairs`` has more pairs, so they get the step ceiling of teachers of all pairs (a split's
    teachers would otherwise stop after a quarter of the steps, before they learned anything)."""
    record = work / "teachers.json"
    if record.is_file():
        return json.loads(record.read_text())
    shutil.rmtree(work, ignore_errors=True)  # an interrupted set is redone whole, never mixed with a new one
    scale = _count(all_pairs) / _count(train) if all_pairs else 1.0
    judges = train_judges_and_score(work, {"train": Path(train), "val": Path(val)}, Path(policy), members, shared,
                                    selection="held_out", epochs_scale=scale)
    result = {"train": str(judges.scored["train"]), "val": str(judges.scored["val"]), "oracle": str(judges.oracle),
              "ensemble": [str(m) for m in judges.ensemble], "validation": judges.validation,
              "oracle_gold_accuracy": gold_accuracy(judges.scored["val"])}
    record.write_text(json.dumps(result, indent=1))
    return result


def _count(path: str) -> int:
    return sum(1 for _ in read_rows(path))


def scored_by(teacher: dict[str, Any], pairs: Path, out: Path, options: dict[str, Any]) -> str:
    """``pairs`` scored by another condition's teachers (the Oracle, then the ensemble)."""
    if not out.is_file():
        score_with_judges(teacher["oracle"], teacher["ensemble"], pairs, out, options)
    return str(out)


# ---------------------------------------------------------------------------------------
# One cell: train, judge on both prompt families, rank the validation pairs


_evaluators: dict[str, Any] = {}


class CellEvaluator:
    """Judges a policy on the evaluation prompts and the out-of-distribution ones (with KL to the
    start), and keeps its margins on the validation pairs (:func:`evaluation.margins.pair_margins`)."""

    def __init__(self, settings: EvalSettings, ood: EvalSettings, val_file: str, reference: str) -> None:
        self.evaluators = {IN_DISTRIBUTION: Evaluator(settings), OUT_OF_DISTRIBUTION: Evaluator(ood)}
        self.val_file, self.reference, self.settings = val_file, reference, settings

    def __call__(self, policy: Path) -> dict[str, Any]:
        scores = {family: evaluate(policy) for family, evaluate in self.evaluators.items()}
        s = self.settings
        margins = pair_margins(policy, self.val_file, reference=self.reference, max_prompt_length=s.max_prompt_length,
                               max_length=s.max_length, batch_size=s.batch_size)
        return {**scores, MARGINS: {k: v.tolist() for k, v in margins.items()}}


def _cell(root: Path, run: RunSpec | None, settings: EvalSettings, ood: EvalSettings | None, val_file: str,
          reference: str, policy: str | None = None) -> dict:
    finished = (root / "scores.json").is_file()
    evaluator = None
    if not finished:
        key = repr((settings, ood, val_file, reference))
        if key not in _evaluators:
            _evaluators[key] = Evaluator(settings) if ood is None else CellEvaluator(settings, ood, val_file, reference)
        evaluator = _evaluators[key]
    return run_cell(root, evaluator, run, policy)


def choose_rate(tried: dict[float, dict[str, dict]], floor: float) -> float:
    """The learning rate with the highest mean gold reward among those whose distinct-2 reaches
    ``floor``; the most diverse one if none does (a collapsed grid is then visible in ``tuning.md``)."""
    qualified = {lr: s for lr, s in tried.items() if s[DISTINCT]["mean"] >= floor}
    if not qualified:
        return max(tried, key=lambda lr: tried[lr][DISTINCT]["mean"])
    return max(qualified, key=lambda lr: qualified[lr]["gold"]["mean"])


# ---------------------------------------------------------------------------------------
# The command


def protocol(
    out: str = "runs/protocol",
    conditions: list[dict[str, Any]] = CONDITIONS,
    methods: dict[str, list[str]] = METHODS,
    seeds: list[int] = [0, 1, 2, 3, 4],
    learning_rates: list[float] = list(LEARNING_RATES),
    max_grid_extensions: int = 2,
    min_distinct_ratio: float = 0.25,
    tuning_condition: str | None = None,
    tuning_seed: int = 0,
    num_tuning_prompts: int = 200,
    max_steps: int = 150,
    judge_steps: int = 375,
    members: int = 3,
    policy: str = str(EMBEDDED / "sft_policy"),
    train_data: str = str(EMBEDDED / "data" / "train.jsonl"),
    val_data: str = str(EMBEDDED / "data" / "val.jsonl"),
    evaluation: EvalSettings = EvalSettings(temperatures=[0.7, 1.0]),
    ood_prompts: str = OOD_PROMPTS,
    jobs: int = 2,
    threads: int = 1,
    overrides: dict[str, Any] | None = None,
    report_only: bool = False,
) -> str:
    """Teachers, tuning, then every method on every condition and seed; the tables in ``out/protocol.md``.

    The protocol is the module docstring's. Writes under ``out``: ``teachers.md``, ``tuning.md``,
    ``protocol.md`` (per condition: the gold and Oracle rewards, distinct-2 and KL on both prompt
    families, win rates against DPO, the margin-bin accuracies), ``cells.csv``, ``frontier.png`` and
    ``timing.json``. What is finished is reported: run it again to go on.

    Args:
        conditions: Label models and teacher arms, each the fields of a :class:`Condition`, run in this order.
        methods: Method name -> recipe layers (``configs/<layer>.yaml``).
        seeds: Training seeds of the evaluation.
        learning_rates: The tuning grid (grown past an edge its choice sits on).
        max_grid_extensions: How many rates a method's grid may grow past its edge.
        min_distinct_ratio: A tuned rate qualifies only if its generations' distinct-2 is at least this
            share of the starting policy's: the gold reward alone rewards a policy that repeats one
            sentence it likes (:func:`choose_rate`). On the embedded default a quarter separates the
            collapsed (SimPO at 3e-3: 2% of the start's) from the DPO family's usual 35-50%.
        tuning_condition: The condition the learning rates are tuned on (default: the first).
        num_tuning_prompts: Prompts of ``val_data`` (no evaluation prompt among them) that judge the tuning.
        max_steps: Optimiser steps of every student.
        judge_steps: Most optimiser steps of each teacher (each keeps its best validation checkpoint).
        members: e-DPO ensemble size.
        policy: The SFT policy every student and teacher starts from, and the KL reference.
        train_data, val_data: Preference pairs with gold score columns (``gold_chosen``, ``gold_rejected``).
        evaluation: How policies are judged (the KL reference is ``policy``).
        ood_prompts: The out-of-distribution prompts every policy is also judged on (default: the
            embedded default's second family, openings and subjects no training prompt uses).
        jobs, threads: Runs at a time, and torch threads per run.
        overrides: Dotted config keys for every training run.
        report_only: Train nothing: write the tables of what is finished under ``out`` (a run still
            going, or one interrupted), each row with the seeds it has.
    """
    require_pretrained(policy, "policy")
    conditions = [as_condition(c) for c in conditions]
    by_name = {c.name: c for c in conditions}
    if not conditions:
        raise UserError("--conditions is empty")
    tuning_condition = tuning_condition or conditions[0].name
    if tuning_condition not in by_name:
        raise UserError(f"--tuning_condition {tuning_condition!r} is none of the conditions {sorted(by_name)}")
    for c in conditions:
        if c.split is not None and c.split not in SPLIT_FILES:
            raise UserError(f"condition {c.name}: split must be one of {sorted(SPLIT_FILES)}, got {c.split!r}")
        if c.teacher not in (OWN, ALL_PAIRS):
            raise UserError(f"condition {c.name}: teacher must be {OWN} or {ALL_PAIRS}, got {c.teacher!r}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    spec = evaluation.data_spec()
    settings = replace(evaluation, kl_reference=policy, keep_prompt_rewards=True)
    ood = replace(settings, prompts=ood_prompts)
    tuning = replace(evaluation, prompts=str(tuning_prompts(val_data, evaluation.prompts, root / "tuning_prompts.jsonl",
                                                            num_tuning_prompts)), num_prompts=None)
    quiet = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
    base = RunSpec("oracle", model=policy, data=spec, flip_seed=FLIP_SEED, validate=False,
                   overrides={**quiet, **(overrides or {})})
    split_files = table1_splits(train_data, root / "splits") if any(c.split for c in conditions) else {}

    def run_of(c: Condition) -> RunSpec:
        return replace(base, overrides={**base.overrides, **{f"data.{k}": v for k, v in c.data.items()}})

    def teacher_key(c: Condition) -> str:
        return ALL_PAIRS if c.teacher == ALL_PAIRS else c.name

    if report_only:
        results, teacher_sets = finished(root, conditions, [*methods, RELABELLED], seeds, teacher_key)
        report = write_report(results, [*methods, RELABELLED], conditions, teacher_sets, val_data, teacher_key, root)
        print(report)
        return report

    with executor(jobs, threads) as pool:
        teacher_futures: dict[str, Future] = {}

        def teachers_of(c: Condition) -> Future:
            key = teacher_key(c)
            if key not in teacher_futures:
                on_split = c.teacher == OWN and c.split is not None
                train = str(split_files[c.split]) if on_split else train_data
                teacher_futures[key] = pool.submit(teachers, root / "teachers" / key, train, val_data, policy, members,
                                                   replace(run_of(c), max_steps=judge_steps),
                                                   train_data if on_split else None)
            return teacher_futures[key]

        def student_data(c: Condition) -> dict[str, str]:
            t = teachers_of(c).result()
            if c.teacher == ALL_PAIRS and c.split is not None:
                return {"train": scored_by(t, split_files[c.split], root / "teachers" / f"all_pairs_on_{c.split}.jsonl",
                                           spec.score_options()), "val": t["val"]}
            return {"train": t["train"], "val": t["val"]}

        def student(c: Condition, method: str, lr: float, seed: int, folder: Path, how: EvalSettings,
                    family_ood: EvalSettings | None) -> Future:
            data = student_data(c)
            train = data["train"]
            layers = methods.get(method, ["dpo"])
            if method == RELABELLED:
                train = str(relabelled_by_teacher(Path(train), folder.parent / "relabelled.jsonl")) \
                    if not (folder / "scores.json").is_file() else train
            recipe = tuple(layers[:1]) + tuple(str(config_path(layer)) for layer in layers[1:])
            run = replace(run_of(c), recipe=recipe, seed=seed, train_file=train, val_file=data["val"],
                          max_steps=max_steps, one_model_in_memory=True,
                          overrides={**run_of(c).overrides, "model.learning_rate": lr})
            return pool.submit(_cell, folder, run, how, family_ood, val_data, policy)

        # The diversity floor of the tuning: a share of the starting policy's distinct-2 on the tuning prompts.
        start = pool.submit(_cell, root / "start" / "tuning", None, tuning, None, val_data, policy, policy=policy)
        floor = min_distinct_ratio * start.result()["scores"][DISTINCT]["mean"]
        # Tuning on one condition, growing a grid past the edge its choice sits on; the next teacher
        # set trains beside the tuning condition's (one set ahead, so the cells of a condition never
        # wait behind every teacher of the protocol).
        tuned_on = by_name[tuning_condition]
        teachers_of(tuned_on)
        teachers_of(next((c for c in conditions if teacher_key(c) != teacher_key(tuned_on)), tuned_on))
        rates = {m: list(learning_rates) for m in methods}
        runs = {m: {lr: student(tuned_on, m, lr, tuning_seed, root / "tuning" / m / f"lr={lr:g}", tuning, None)
                    for lr in rates[m]} for m in methods}
        for extension in range(max_grid_extensions + 1):
            tried = {m: {lr: f.result()["scores"] for lr, f in runs[m].items()} for m in methods}
            chosen = {m: choose_rate(tried[m], floor) for m in methods}
            beyond = {m: beyond_edge(chosen[m], rates[m]) for m in methods}
            beyond = {m: lr for m, lr in beyond.items() if lr is not None}
            if not beyond or extension == max_grid_extensions:
                break
            for m, lr in beyond.items():
                rates[m].append(lr)
                runs[m][lr] = student(tuned_on, m, lr, tuning_seed, root / "tuning" / m / f"lr={lr:g}", tuning, None)
        (root / "tuning.md").write_text(tuning_table(tried, chosen, rates, floor) + "\n")
        if (root / "chosen.json").is_file() and json.loads((root / "chosen.json").read_text()) != chosen:
            raise UserError(f"{root}: the learning rates chosen now, {chosen}, differ from those its evaluation cells "
                            f"were trained with ({root / 'chosen.json'}); give a new --out")
        (root / "chosen.json").write_text(json.dumps(chosen, indent=1))
        chosen[RELABELLED] = chosen.get("dpo", learning_rates[len(learning_rates) // 2])

        # Evaluation: seeds in order within each condition, conditions in the given order.
        futures: dict[str, dict[tuple[str, int], Future]] = {}
        for k, c in enumerate(conditions):
            if k + 1 < len(conditions):
                teachers_of(conditions[k + 1])
            names = [*methods, *([RELABELLED] if c.teacher == ALL_PAIRS and "dpo" in methods else [])]
            futures[c.name] = {(m, seed): student(c, m, chosen[m], seed, root / c.name / f"seed_{seed}" / m, settings, ood)
                               for seed in seeds[:c.seeds] for m in names}
        results = {name: {k: f.result() for k, f in fs.items()} for name, fs in futures.items()}
        teacher_sets = {key: f.result() for key, f in teacher_futures.items()}

    report = write_report(results, [*methods, RELABELLED], conditions, teacher_sets, val_data, teacher_key, root)
    print(report)
    (root / "timing.json").write_text(json.dumps({"seconds_this_invocation": time.perf_counter() - began,
                                                  "jobs": jobs, "threads": threads}))
    return report


def finished(root: Path, conditions: list[Condition], methods: list[str], seeds: list[int],
             teacher_key) -> tuple[dict[str, dict[tuple[str, int], dict]], dict[str, dict]]:
    """The cells and teacher sets already finished under ``root`` (their ``scores.json``/``teachers.json``)."""
    results = {}
    for c in conditions:
        files = {(m, seed): root / c.name / f"seed_{seed}" / m / "scores.json" for seed in seeds[:c.seeds] for m in methods}
        results[c.name] = {k: json.loads(f.read_text()) for k, f in files.items() if f.is_file()}
    keys = dict.fromkeys(map(teacher_key, conditions))
    teacher_sets = {k: json.loads((root / "teachers" / k / "teachers.json").read_text()) for k in keys
                    if (root / "teachers" / k / "teachers.json").is_file()}
    return results, teacher_sets
