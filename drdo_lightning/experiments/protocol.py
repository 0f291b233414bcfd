"""The experiment engine: conditions x methods x seeds, tuned on one condition, judged and tabulated.

``protocol`` runs one resumable command over *conditions* (:class:`conditions.Condition`): each says
how the training labels are made (a label-noise model of the data options, or an easy/hard split as
the paper's Table 1) and which teachers the students distil (trained on the condition's own pairs,
one set trained on all pairs, or the scores the data carries). Its configurations reproduce each
sweep of the project (docs/experiments.md):

- ``configs/protocol.yaml``: the paper's regime (near-tie noise, Table 1's splits, teachers at their best);
- ``configs/compare.yaml``: every method tuned on held-out prompts at flip 0 (learning rate and its
  main knob), then at each uniform flip rate and seed, judged per temperature;
- ``configs/robustness.yaml``: every method at its recipe's settings at each uniform flip rate and seed.

1. **Teachers.** Per teacher set, the Oracle and the e-DPO ensemble train on the condition's noisy
   pairs from the students' SFT policy (the Oracle optionally from its own, larger one:
   ``oracle_shape``), validating where ``teacher_selection`` says, export their best checkpoint and
   rescore the pairs (:func:`conditions.teachers`). ``teachers_from`` reuses an earlier run's sets.
2. **Tuning.** With ``learning_rates``, on ``tuning_condition`` every method trains at every
   setting of its grid (each learning rate times its knobs in ``grid``) with one seed, judged by the
   gold reward on tuning prompts (validation prompts that are no evaluation prompt);
   :func:`tuning.choose` picks, and a method whose choice sits at the grid's edge gets the next rate
   past it (:func:`sweeps.beyond_edge`) until its choice is interior or ``max_grid_extensions`` were
   added. Without, every method trains at its recipe's settings.
3. **Evaluation.** Every method at its chosen setting, on every condition and seed (a condition may
   name fewer seeds: a secondary one), judged on the evaluation prompts (and the out-of-distribution
   ones, ``ood_prompts``) by every judge, with distinct-2 and KL(π || π_SFT) on the policy's own
   samples; and its margins on the validation pairs (:mod:`evaluation.margins`), which give the
   ranking accuracy by |gold margin| and a reward head's correlation with its teacher. Conditions with
   the all-pairs teachers also train ``dpo_relabelled``: DPO on the pairs ordered by that Oracle, the
   control that separates DRDO's extra information from robustness.

Runs go to ``jobs`` worker processes of ``threads`` torch threads; the seeds run in order, so an
interrupted command has every method at the seeds it finished, and a finished cell or teacher set
is never redone.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from drdo_lightning.embedded_default import EMBEDDED, OOD_PROMPTS
from drdo_lightning.errors import UserError, require_pretrained
from drdo_lightning.evaluation.margins import pair_margins
from drdo_lightning.experiments.conditions import (
    ALL_PAIRS,
    GIVEN,
    GOLD_COLUMNS,
    OWN,
    Condition,
    as_condition,
    finished_teachers,
    given_teachers,
    oracle_sft_policy,
    relabelled_by_teacher,
    scored_by,
    table1_splits,
    teachers,
)
from drdo_lightning.experiments.protocol_report import (
    IN_DISTRIBUTION,
    MARGINS,
    OUT_OF_DISTRIBUTION,
    teacher_margins,
    tuning_table,
    write_report,
)
from drdo_lightning.experiments.sweeps import DISTINCT, FLIP_SEED, KL, EvalSettings, Evaluator, beyond_edge, executor, \
    run_cell, tuning_prompts
from drdo_lightning.experiments.tuning import LEARNING_RATE, choose, recipe_of, setting_name, settings_of, tuned_entry
from drdo_lightning.reports import write_csv
from drdo_lightning.training import RunSpec

log = logging.getLogger(__name__)

RELABELLED = "dpo_relabelled"  # DPO on the pairs ordered by the all-pairs Oracle (the control of that arm)


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


# ---------------------------------------------------------------------------------------
# One cell: train, judge on each prompt family, take the margins on the validation pairs


class CellEvaluator:
    """Judges a policy on each prompt family (:class:`sweeps.Evaluator`) and keeps its margins on the
    validation pairs (:func:`evaluation.margins.pair_margins`, against the starting policy)."""

    def __init__(self, families: dict[str, EvalSettings], val_file: str, reference: str) -> None:
        self.evaluators = {family: Evaluator(settings) for family, settings in families.items()}
        self.settings = next(iter(families.values()))
        self.val_file, self.reference = val_file, reference

    def __call__(self, policy: Path) -> dict[str, Any]:
        scores = {family: evaluate(policy) for family, evaluate in self.evaluators.items()}
        s = self.settings
        margins = pair_margins(policy, self.val_file, reference=self.reference, max_prompt_length=s.max_prompt_length,
                               max_length=s.max_length, batch_size=s.batch_size)
        return {**scores, MARGINS: {k: v.tolist() for k, v in margins.items()}}


_evaluators: dict[str, CellEvaluator] = {}  # per worker process: the judges load once


def _cell(root: Path, run: RunSpec | None, families: dict[str, EvalSettings], val_file: str, reference: str,
          policy: str | None = None) -> dict:
    """:func:`sweeps.run_cell` with a :class:`CellEvaluator` (a finished cell is read back without one)."""
    evaluator = None
    if not (root / "scores.json").is_file():
        key = repr((families, val_file, reference))
        if key not in _evaluators:
            _evaluators[key] = CellEvaluator(families, val_file, reference)
        evaluator = _evaluators[key]
    return run_cell(root, evaluator, run, policy)


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


# ---------------------------------------------------------------------------------------
# The command


def protocol(
    out: str = "runs/protocol",
    conditions: list[dict[str, Any]] = CONDITIONS,
    methods: dict[str, list[str]] = METHODS,
    seeds: list[int] = [0, 1, 2, 3, 4],
    learning_rates: list[float] | None = list(LEARNING_RATES),
    grid: dict[str, dict[str, list]] | None = None,
    max_grid_extensions: int = 2,
    min_distinct_ratio: float = 0.25,
    distill_tolerance: float | None = None,
    tuning_condition: str | None = None,
    tuning_seed: int = 0,
    num_tuning_prompts: int = 200,
    max_steps: int = 150,
    judge_steps: int = 375,
    members: int = 3,
    teacher_selection: Literal["auto", "held_out", "val_file"] = "held_out",
    teachers_from: str | None = None,
    oracle_policy: str | None = None,
    oracle_shape: dict[str, int] | None = None,
    policy: str = str(EMBEDDED / "sft_policy"),
    sft_data: str = str(EMBEDDED / "data" / "sft.jsonl"),
    train_data: str = str(EMBEDDED / "data" / "train.jsonl"),
    val_data: str = str(EMBEDDED / "data" / "val.jsonl"),
    evaluation: EvalSettings = EvalSettings(temperatures=[0.7, 1.0]),
    ood_prompts: str | None = OOD_PROMPTS,
    views: list[Literal["conditions", "across", "temperatures", "splits"]] = ["conditions", "splits"],
    jobs: int = 2,
    threads: int = 1,
    overrides: dict[str, Any] | None = None,
    report_only: bool = False,
) -> str:
    """Teachers, tuning, then every method on every condition and seed; the tables in ``out/protocol.md``.

    The protocol is the module docstring's. Writes under ``out``: ``teachers.md``, ``tuning.md`` and
    ``tuning.csv`` (with ``learning_rates``), ``protocol.md`` (the ``views``), ``cells.csv`` (every
    cell's measures), ``summary.csv`` (their means over seeds with 95% t-intervals), ``frontier.png``
    (gold reward against KL), ``across.png`` (each measure against the condition) and ``timing.json``.
    What is finished is reported: run it again to go on.

    Args:
        conditions: Label models and teacher arms, each the fields of a :class:`conditions.Condition`, run in this order.
        methods: Method name -> recipe layers (``configs/<layer>.yaml``).
        seeds: Training seeds of the evaluation.
        learning_rates: The tuning grid (grown past an edge its choice sits on); None: no tuning, every
            method trains at its recipe's settings.
        grid: Per method, knobs tuned with the learning rate: config keys (``model.beta``) or
            ``variant`` (a layer under ``configs/ablations/``, or ``paper`` for none) and their values.
        max_grid_extensions: How many rates a method's grid may grow past its edge.
        min_distinct_ratio: A tuned setting qualifies only if its generations' distinct-2 is at least
            this share of the starting policy's: the gold reward alone rewards a policy that repeats one
            sentence it likes (:func:`tuning.choose`). On the embedded default a quarter separates the
            collapsed (SimPO at 3e-3: 2% of the start's) from the DPO family's usual 35-50%.
        distill_tolerance: With a ``variant`` knob, a DRDO form qualifies only if its reward-margin
            correlation with its Oracle is at least the paper form's (same other settings) minus this.
        tuning_condition: The condition the settings are tuned on (default: the first).
        tuning_seed: The seed every tuning run uses.
        num_tuning_prompts: Prompts of ``val_data`` (no evaluation prompt among them) that judge the tuning.
        max_steps: Optimiser steps of every student.
        judge_steps: Most optimiser steps of each teacher (each keeps its best validation checkpoint).
        members: e-DPO ensemble size.
        teacher_selection: Where the teachers validate (:func:`stages.train_judges_and_score`):
            ``held_out`` (a tenth of their own noisy pairs), ``val_file`` or ``auto``.
        teachers_from: The ``out`` of an earlier run whose teacher sets (by name) every condition uses
            instead of training its own, so a variant is compared under the very same teachers.
        oracle_policy: The SFT policy the Oracle starts from (default: ``policy``).
        oracle_shape: Build the Oracle's SFT policy instead: a Llama of this shape (config fields over
            the students' tiny Llama) fine-tuned on ``sft_data`` (under ``out/oracle_policy``).
        policy: The SFT policy every student and teacher starts from, and the KL reference.
        train_data, val_data: Preference pairs; the splits and the margin bins need gold score columns
            (``gold_chosen``, ``gold_rejected``), ``given`` teachers the Oracle and ensemble scores.
        evaluation: How policies are judged (the KL reference is ``policy``); the tuning reads the judge ``gold``.
        ood_prompts: Out-of-distribution prompts every policy is also judged on (default: the embedded
            default's second family, openings and subjects no training prompt uses); None: none.
        views: The sections of ``protocol.md`` after the teachers: ``conditions`` (one per condition:
            every measure per prompt family, win rates against DPO, ranking accuracy by |gold margin|),
            ``across`` (each measure, the conditions side by side), ``temperatures`` (each measure per
            condition, pooled and per temperature), ``splits`` (Table 1's splits side by side per arm).
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
    grid = grid or {}
    tuning_condition = tuning_condition or conditions[0].name
    if learning_rates is not None:
        if tuning_condition not in by_name:
            raise UserError(f"--tuning_condition {tuning_condition!r} is none of the conditions {sorted(by_name)}")
        if "gold" not in evaluation.judges:
            raise UserError(f"--evaluation.judges: the tuning chooses by the judge named 'gold'; got {sorted(evaluation.judges)}")
    if set(grid) - set(methods):  # a configuration may hold the grids of methods a run leaves out
        log.info("--grid: %d methods not in --methods, not tuned: %s", len(set(grid) - set(methods)),
                 sorted(set(grid) - set(methods)))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    spec = evaluation.data_spec()
    settings = replace(evaluation, kl_reference=policy, keep_prompt_rewards=True)
    families = {IN_DISTRIBUTION: settings, **({OUT_OF_DISTRIBUTION: replace(settings, prompts=ood_prompts)}
                                              if ood_prompts else {})}
    quiet = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
    base = RunSpec("oracle", model=policy, data=spec, flip_seed=FLIP_SEED, validate=False,
                   overrides={**quiet, **(overrides or {})})
    split_files = table1_splits(train_data, root / "splits") if any(c.split for c in conditions) else {}
    names = [*methods, RELABELLED]

    def report(results, teacher_sets, reference) -> str:
        text = write_report(results, names, conditions, teacher_sets, val_data, root, [*evaluation.judges, DISTINCT, KL],
                            evaluation.temperatures, views, reference)
        print(text)
        return text

    if report_only:
        start = root / "start" / "evaluation" / "scores.json"
        return report(*finished(root, conditions, names, seeds, train_data, val_data, teachers_from),
                      json.loads(start.read_text())["scores"] if start.is_file() else None)

    def run_of(c: Condition) -> RunSpec:
        return replace(base, overrides={**base.overrides, **{f"data.{k}": v for k, v in c.data.items()}})

    with executor(jobs, threads) as pool:
        start = pool.submit(_cell, root / "start" / "evaluation", None, families, val_data, policy, policy=policy)
        oracle_start = oracle_policy
        if oracle_shape is not None:
            oracle_start = pool.submit(oracle_sft_policy, root / "oracle_policy", policy, oracle_shape, sft_data, val_data,
                                       spec, base.overrides).result()
        teacher_futures: dict[str, Future] = {}

        def teachers_of(c: Condition) -> Future:
            key = c.teacher_key()
            if key not in teacher_futures:
                on_split = c.teacher == OWN and c.split is not None
                if c.teacher == GIVEN:
                    teacher_futures[key] = _done(given_teachers(train_data, val_data))
                elif teachers_from is not None:
                    teacher_futures[key] = _done(finished_teachers(teachers_from, key))
                else:
                    teacher_futures[key] = pool.submit(
                        teachers, root / "teachers" / key, str(split_files[c.split]) if on_split else train_data,
                        val_data, policy, members, replace(run_of(c), max_steps=judge_steps), teacher_selection,
                        train_data if on_split else None, oracle_start)
            return teacher_futures[key]

        def student_data(c: Condition) -> dict[str, str]:
            t = teachers_of(c).result()
            if c.teacher == ALL_PAIRS and c.split is not None:
                return {"train": scored_by(t, split_files[c.split], root / "teachers" / f"all_pairs_on_{c.split}.jsonl",
                                           spec.score_options()), "val": t["val"]}
            return {"train": t["train"], "val": t["val"]}

        def student(c: Condition, method: str, setting: dict[str, Any], seed: int, folder: Path,
                    judged_on: dict[str, EvalSettings]) -> Future:
            data = student_data(c)
            train = data["train"]
            if method == RELABELLED and not (folder / "scores.json").is_file():
                train = str(relabelled_by_teacher(Path(train), folder.parent / "relabelled.jsonl"))
            recipe, knobs = recipe_of(methods.get(method, ["dpo"]), setting)
            run = replace(run_of(c), recipe=recipe, seed=seed, train_file=train, val_file=data["val"],
                          max_steps=max_steps, one_model_in_memory=True, overrides={**run_of(c).overrides, **knobs})
            return pool.submit(_cell, folder, run, judged_on, val_data, policy)

        chosen = {m: {} for m in methods}  # without tuning: the recipes' settings
        if learning_rates is not None:
            chosen = _tune(root, pool, by_name[tuning_condition], conditions, methods, grid, learning_rates, families,
                           val_data, policy, evaluation.prompts, num_tuning_prompts, min_distinct_ratio,
                           distill_tolerance, max_grid_extensions, tuning_seed, teachers_of, student_data, student)
        if "dpo" in methods:
            chosen[RELABELLED] = chosen["dpo"]

        # Evaluation: seeds in order within each condition, conditions in the given order.
        futures: dict[str, dict[tuple[str, int], Future]] = {}
        for k, c in enumerate(conditions):
            if k + 1 < len(conditions):
                teachers_of(conditions[k + 1])
            evaluated = [*methods, *([RELABELLED] if c.teacher == ALL_PAIRS and "dpo" in methods else [])]
            futures[c.name] = {(m, seed): student(c, m, chosen[m], seed, root / c.name / f"seed_{seed}" / m, families)
                               for seed in seeds[:c.seeds] for m in evaluated}
        results = {name: {k: f.result() for k, f in fs.items()} for name, fs in futures.items()}
        teacher_sets = {key: f.result() for key, f in teacher_futures.items()}
        reference = start.result()["scores"]

    text = report(results, teacher_sets, reference)
    (root / "timing.json").write_text(json.dumps({"seconds_this_invocation": time.perf_counter() - began,
                                                  "jobs": jobs, "threads": threads}))
    return text


def _tune(root: Path, pool, tuned_on: Condition, conditions: list[Condition], methods: dict[str, list[str]],
          grid: dict[str, dict[str, list]], learning_rates: list[float], families: dict[str, EvalSettings],
          val_data: str, policy: str, eval_prompts: str, num_tuning_prompts: int, min_distinct_ratio: float,
          distill_tolerance: float | None, max_grid_extensions: int, tuning_seed: int, teachers_of, student_data,
          student) -> dict[str, dict[str, Any]]:
    """Every method's grid on ``tuned_on`` with one seed, grown past the edge its choice sits on; writes
    ``tuning.md``/``tuning.csv`` and ``chosen.json`` and returns each method's chosen setting."""
    prompts = tuning_prompts(val_data, eval_prompts, root / "tuning_prompts.jsonl", num_tuning_prompts)
    tuning = {IN_DISTRIBUTION: replace(families[IN_DISTRIBUTION], prompts=str(prompts), num_prompts=None)}
    # The diversity floor of the tuning: a share of the starting policy's distinct-2 on the tuning prompts.
    start = pool.submit(_cell, root / "start" / "tuning", None, tuning, val_data, policy, policy=policy).result()
    floor = min_distinct_ratio * start["scores"][IN_DISTRIBUTION][DISTINCT]["mean"]
    # The next teacher set trains beside the tuning condition's (one set ahead, so the cells of a
    # condition never wait behind every teacher of the protocol).
    teachers_of(tuned_on)
    teachers_of(next((c for c in conditions if c.teacher_key() != tuned_on.teacher_key()), tuned_on))
    margins = teacher_margins(student_data(tuned_on))

    def tune(m: str, rates: list[float]) -> dict[str, tuple[dict, Future]]:
        return {setting_name(s): (s, student(tuned_on, m, s, tuning_seed, root / "tuning" / m / setting_name(s), tuning))
                for s in settings_of(grid.get(m, {}), rates)}

    rates = {m: list(learning_rates) for m in methods}
    runs = {m: tune(m, rates[m]) for m in methods}
    for extension in range(max_grid_extensions + 1):
        tuned = {m: [tuned_entry(s, f.result()["scores"], margins) for s, f in runs[m].values()] for m in methods}
        chosen = {m: choose(tuned[m], floor, distill_tolerance)["setting"] for m in methods}
        beyond = {m: beyond_edge(chosen[m][LEARNING_RATE], rates[m]) for m in methods}
        beyond = {m: lr for m, lr in beyond.items() if lr is not None}
        if not beyond or extension == max_grid_extensions:
            break
        for m, lr in beyond.items():
            rates[m].append(lr)
            runs[m].update(tune(m, [lr]))
    (root / "tuning.md").write_text(tuning_table(tuned, chosen, rates, floor, start["scores"][IN_DISTRIBUTION]) + "\n")
    write_csv([{"method": m, "setting": setting_name(e["setting"]), **{k: v for k, v in e.items() if k != "setting"}}
               for m, entries in tuned.items() for e in entries], root / "tuning.csv")
    record = root / "chosen.json"
    if record.is_file() and json.loads(record.read_text()) != chosen:
        raise UserError(f"{root}: the settings chosen now, {chosen}, differ from those its evaluation cells were "
                        f"trained with ({record}); give a new --out")
    record.write_text(json.dumps(chosen, indent=1))
    return chosen


def finished(root: Path, conditions: list[Condition], methods: list[str], seeds: list[int], train_data: str,
             val_data: str, teachers_out: str | None) -> tuple[dict[str, dict[tuple[str, int], dict]], dict[str, dict]]:
    """The cells and teacher sets already finished under ``root`` (their ``scores.json``/``teachers.json``)."""
    results = {}
    for c in conditions:
        files = {(m, seed): root / c.name / f"seed_{seed}" / m / "scores.json" for seed in seeds[:c.seeds] for m in methods}
        results[c.name] = {k: json.loads(f.read_text()) for k, f in files.items() if f.is_file()}
    teacher_sets = {}
    for key in dict.fromkeys(c.teacher_key() for c in conditions):
        record = Path(teachers_out or root) / "teachers" / key / "teachers.json"
        if key == GIVEN:
            teacher_sets[key] = given_teachers(train_data, val_data)
        elif record.is_file():
            teacher_sets[key] = json.loads(record.read_text())
    return results, teacher_sets
