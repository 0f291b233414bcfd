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
- ``configs/frontier.yaml``: DRDO tuned on its own knobs (both readings of its student's reward) and
  every method traced along its distance knob, compared at equal KL on the paper's main conditions.
- ``configs/online.yaml``: online DRDO, DPO and IPO against the best offline methods, at equal KL
  and against the Oracle's own reward (over-optimisation of the proxy).

1. **Teachers.** Per teacher set, the Oracle and the e-DPO ensemble train on the condition's noisy
   pairs from the students' SFT policy (the Oracle optionally from its own, larger one:
   ``oracle_shape``), validating where ``teacher_selection`` says, export their best checkpoint and
   rescore the pairs (:func:`conditions.teachers`). ``teachers_from`` reuses an earlier run's sets.
2. **Tuning.** With ``learning_rates``, on ``tuning_condition`` every method trains with one seed
   at the settings its :class:`tuning.Search` asks for (``search``: every learning rate times its
   knobs in ``grid``, or one axis at a time), judged by the gold reward on tuning prompts (validation
   prompts that are no evaluation prompt); :func:`tuning.choose` picks, and an axis whose choice
   sits at the edge of the values tried grows past it (:func:`sweeps.beyond_edge`) until its choice
   is interior or ``max_grid_extensions`` were added. Without, every method trains at its recipe's
   settings.
3. **Evaluation.** Every method at its chosen setting, on every condition and seed (a condition may
   name fewer seeds: a secondary one), judged on the evaluation prompts (and the out-of-distribution
   ones, ``ood_prompts``) by every judge, with distinct-2 and KL(π || π_SFT) on the policy's own
   samples; and its margins on the validation pairs (:mod:`evaluation.margins`), which give the
   ranking accuracy by |gold margin| and a reward head's correlation with its teacher. Conditions with
   the all-pairs teachers also train ``dpo_relabelled``: DPO on the pairs ordered by that Oracle, the
   control that separates DRDO's extra information from robustness.

   A method whose recipe trains online (:func:`tuning.trains_online`) learns from the same teacher
   as the offline students of its condition: its judge (``model.online.judge``) is the condition's
   Oracle (the teacher set's export; on a ``given`` condition ``given_oracle``, the Oracle whose
   scores the data carries), its prompts are those of the condition's training pairs, and the
   condition's label noise reaches it only through that Oracle (noise options flip a file's labels,
   and it reads none).
4. **The frontier.** With ``frontier``, on ``frontier_conditions`` every traced method runs along the
   knob that sets its distance from the start (its chosen setting, the knob at each listed value and
   at the tuned one) with ``frontier_seeds`` seeds; the report reads each method's curves at the KL
   levels ``kl_levels`` and, with ``verdict``, says whether each compared method is ahead, level or
   behind each baseline there (:mod:`experiments.frontier`).

A cell identical to another (:mod:`experiments.cells`) is that one's result: the frontier's tuned
point is the evaluation's cell, a tuning cell's export is judged again rather than trained again,
and a student that reads no teacher's scores trains once for both teacher arms of a split (an
online student reads its Oracle through the judge: it trains anew for each teacher set).

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
from drdo_lightning.experiments.cells import IN_DISTRIBUTION, OUT_OF_DISTRIBUTION, Cells, done, training_key
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
from drdo_lightning.experiments.frontier import KL_LEVELS, Frontiers, check_frontier, points_of
from drdo_lightning.experiments.protocol_report import teacher_margins, tuning_table, write_report
from drdo_lightning.experiments.sweeps import DISTINCT, FLIP_SEED, KL, EvalSettings, executor, tuning_prompts
from drdo_lightning.experiments.tuning import (
    GRID,
    Search,
    choose,
    reads_scores,
    recipe_of,
    setting_name,
    trains_online,
    tuned_entry,
)
from drdo_lightning.reports import write_csv
from drdo_lightning.training import RunSpec

log = logging.getLogger(__name__)

RELABELLED = "dpo_relabelled"  # DPO on the pairs ordered by the all-pairs Oracle (the control of that arm)
ONLINE_JUDGE = "model.online.judge"  # the Oracle an online student samples against: its condition's


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
# The command


def protocol(
    out: str = "runs/protocol",
    conditions: list[dict[str, Any]] = CONDITIONS,
    methods: dict[str, list[str]] = METHODS,
    seeds: list[int] = [0, 1, 2, 3, 4],
    learning_rates: list[float] | None = list(LEARNING_RATES),
    grid: dict[str, dict[str, list]] | None = None,
    search: Literal["grid", "coordinates"] = GRID,
    max_grid_extensions: int = 2,
    extend_knobs: bool = False,
    min_distinct_ratio: float = 0.25,
    max_tuning_kl: float | None = None,
    distill_tolerance: float | None = None,
    tuning_condition: str | None = None,
    tuning_seed: int = 0,
    num_tuning_prompts: int = 200,
    frontier: dict[str, dict[str, list]] | None = None,
    frontier_conditions: list[str] | None = None,
    frontier_seeds: int | None = None,
    kl_levels: list[float] = list(KL_LEVELS),
    verdict: dict[str, list[str]] | None = None,
    max_steps: int = 150,
    judge_steps: int = 375,
    members: int = 3,
    teacher_selection: Literal["auto", "held_out", "val_file"] = "held_out",
    teachers_from: str | None = None,
    oracle_policy: str | None = None,
    oracle_shape: dict[str, int] | None = None,
    given_oracle: str | None = str(EMBEDDED / "oracle"),
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
    """Teachers, tuning, every method on every condition and seed, the equal-KL frontier (protocol.md).

    The protocol is the module docstring's. Writes under ``out``: ``teachers.md``, ``tuning.md`` and
    ``tuning.csv`` (with ``learning_rates``), ``protocol.md`` (with ``frontier``, the verdict and the
    gold reward at equal KL first; then the ``views``), ``cells.csv`` (every cell's measures),
    ``summary.csv`` (their means over seeds with 95% t-intervals), ``frontier.png`` (gold reward
    against KL at the tuned points), ``across.png`` (each measure against the condition),
    ``timing.json``; with ``frontier``, ``frontier.csv`` (every traced cell), ``equal_kl.csv``,
    ``equal_kl.md`` and ``frontier_curves.png`` (a curve per method). What is finished is reported:
    run it again to go on.

    Args:
        conditions: Label models and teacher arms, each the fields of a :class:`conditions.Condition`, run in this order.
        methods: Method name -> recipe layers (``configs/<layer>.yaml``).
        seeds: Training seeds of the evaluation.
        learning_rates: The tuning's learning rates (grown past an edge its choice sits on); None: no
            tuning, every method trains at its recipe's settings.
        grid: Per method, knobs tuned with the learning rate: config keys (``model.beta``) or
            ``variant`` (a layer under ``configs/ablations/``, or ``paper`` for none) and their values.
            With ``search: coordinates`` the first value of each is where the search starts: list
            the recipe's own first.
        search: ``grid``: every learning rate times every knob value; ``coordinates``: the learning
            rates at the knobs' first values, then each knob in turn at the choice so far, then the
            learning rate at the ladder's neighbours of its choice (:class:`tuning.Search`).
        max_grid_extensions: How many ladder steps an axis may grow past the edge its choice sits on.
        extend_knobs: Grow a knob of positive numbers past its edge too, not only the learning rate.
        min_distinct_ratio: A tuned setting qualifies only if its generations' distinct-2 is at least
            this share of the starting policy's: the gold reward alone rewards a policy that repeats one
            sentence it likes (:func:`tuning.choose`). On the embedded default a quarter separates the
            collapsed (SimPO at 3e-3: 2% of the start's) from the DPO family's usual 35-50%.
        max_tuning_kl: A tuned setting qualifies only if its KL to the starting policy (nats, on the tuning
            prompts) is at most this (None: any). Far from the start a student can write a salad of the
            words the gold judge likes: diverse enough for ``min_distinct_ratio``, scored near the top.
        distill_tolerance: With a ``variant`` knob, a DRDO form qualifies only if its reward-margin
            correlation with its Oracle is at least the paper form's (same other settings) minus this.
        tuning_condition: The condition the settings are tuned on (default: the first).
        tuning_seed: The seed every tuning run uses.
        num_tuning_prompts: Prompts of ``val_data`` (no evaluation prompt among them) that judge the tuning.
        frontier: Per method, the one knob it is traced along and its values (``{dpo: {model.beta:
            [0.03, 0.1, 0.3, 1.0]}}``); the tuned value is traced too. ``dpo_relabelled`` follows
            ``dpo``'s. None: no frontier.
        frontier_conditions: The conditions the frontier is traced on (None: all).
        frontier_seeds: How many of ``seeds`` each traced point runs (None: all).
        kl_levels: The KL levels (nats) each method's curves are read at.
        verdict: Per compared method (each reading of DRDO), the baselines it is ahead of, level with
            or behind at equal KL (on a traced condition; at the tuned points on the others).
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
        given_oracle: The Oracle whose scores ``train_data`` carries (default: the embedded default's,
            which scored its pairs): the teacher of a ``given`` condition, so the judge of its online
            students; with your own data name yours, or None (online methods then cannot run there).
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
    names = [*methods, RELABELLED]
    tuning_condition = tuning_condition or conditions[0].name
    if learning_rates is not None:
        if tuning_condition not in by_name:
            raise UserError(f"--tuning_condition {tuning_condition!r} is none of the conditions {sorted(by_name)}")
        if "gold" not in evaluation.judges:
            raise UserError(f"--evaluation.judges: the tuning chooses by the judge named 'gold'; got {sorted(evaluation.judges)}")
    if set(grid) - set(methods):  # a configuration may hold the grids of methods a run leaves out
        log.info("--grid: %d methods not in --methods, not tuned: %s", len(set(grid) - set(methods)),
                 sorted(set(grid) - set(methods)))
    if set(frontier or {}) - set(methods):  # likewise
        log.info("--frontier: %d methods not in --methods, not traced: %s", len(set(frontier) - set(methods)),
                 sorted(set(frontier) - set(methods)))
    frontier = {m: spec for m, spec in (frontier or {}).items() if m in methods}
    traced_on = list(by_name) if frontier_conditions is None else frontier_conditions
    check_frontier(frontier, list(methods), list(by_name), traced_on)
    for method, baselines in (verdict or {}).items():
        if unknown := sorted({method, *baselines} - set(names)):
            raise UserError(f"--verdict: {unknown} are none of the methods {names}")
    online_methods = [m for m, layers in methods.items() if trains_online(recipe_of(layers, {})[0])]
    if online_methods and given_oracle is None and (given := [c.name for c in conditions if c.teacher == GIVEN]):
        raise UserError(f"--methods {online_methods} train online, judged by their condition's Oracle, and on the conditions "
                        f"{given} (teacher {GIVEN}) that is the Oracle whose scores --train_data carries: name it "
                        "with --given_oracle")
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
    traced_seeds = seeds[:frontier_seeds]

    def report(results, teacher_sets, reference, traced) -> str:
        frontiers = Frontiers(traced, knobs_of(frontier), kl_levels, verdict) if frontier else None
        text = write_report(results, names, conditions, teacher_sets, val_data, root, [*evaluation.judges, DISTINCT, KL],
                            evaluation.temperatures, views, reference, frontiers)
        print(text)
        return text

    if report_only:
        start = root / "start" / "evaluation" / "scores.json"
        record = root / "chosen.json"
        chosen = _with_relabelled(json.loads(record.read_text()) if record.is_file() else {m: {} for m in methods})
        results, teacher_sets = finished(root, conditions, names, seeds, train_data, val_data, teachers_from,
                                         given_oracle)
        traced = {name: finished_traced(root, by_name[name], frontier, chosen, traced_seeds) for name in traced_on}
        return report(results, teacher_sets, json.loads(start.read_text())["scores"] if start.is_file() else None,
                      traced if frontier else {})

    def run_of(c: Condition) -> RunSpec:
        return replace(base, overrides={**base.overrides, **{f"data.{k}": v for k, v in c.data.items()}})

    with executor(jobs, threads) as pool:
        cells = Cells(pool, val_data, policy)
        start = cells.judge(root / "start" / "evaluation", policy, families)
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
                    teacher_futures[key] = done(given_teachers(train_data, val_data, given_oracle))
                elif teachers_from is not None:
                    teacher_futures[key] = done(finished_teachers(teachers_from, key))
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

        def online_run(c: Condition) -> RunSpec:
            """The shared settings of an online student on ``c``: its judge the condition's Oracle, and
            none of the condition's label-noise options (they flip a pairs file's labels; it reads only prompts)."""
            return replace(base, overrides={**base.overrides, ONLINE_JUDGE: teachers_of(c).result()["oracle"]})

        relabelled: dict[str, str] = {}  # per condition, its pairs ordered by its Oracle: written once a run

        def student(c: Condition, method: str, setting: dict[str, Any], seed: int, folder: Path,
                    judged_on: dict[str, EvalSettings]) -> Future:
            data = student_data(c)
            train = data["train"]
            if method == RELABELLED:
                if c.name not in relabelled:
                    relabelled[c.name] = str(relabelled_by_teacher(Path(train), root / c.name / "relabelled.jsonl"))
                train = relabelled[c.name]
            recipe, knobs = recipe_of(methods.get(method, ["dpo"]), setting)
            online = trains_online(recipe)
            shared = online_run(c) if online else run_of(c)
            # An online reference model is live (its pairs are sampled as it trains): nothing to precompute.
            run = replace(shared, recipe=recipe, seed=seed, train_file=train, val_file=data["val"], max_steps=max_steps,
                          one_model_in_memory=not online, overrides={**shared.overrides, **knobs})
            # A student that reads no scores trains the same on the same pairs whoever scored them; an
            # online one reads its teachers' Oracle as its judge.
            pairs = None if method == RELABELLED or online or reads_scores(recipe) else f"{c.split or 'all'} pairs"
            return cells.submit(folder, run, judged_on, training_key(run, pairs))

        chosen = {m: {} for m in methods}  # without tuning: the recipes' settings
        if learning_rates is not None:
            chosen = _tune(root, cells, by_name[tuning_condition], conditions, methods, grid, learning_rates, search,
                           max_grid_extensions, extend_knobs, families, val_data, policy, evaluation.prompts,
                           num_tuning_prompts, min_distinct_ratio, max_tuning_kl, distill_tolerance, tuning_seed,
                           teachers_of, student_data, student)
        chosen = _with_relabelled(chosen)

        # Evaluation: seeds in order within each condition, conditions in the given order; then the
        # condition's frontier, seed by seed, so an interrupted run has whole curves of its first seeds.
        futures: dict[str, dict[tuple[str, int], Future]] = {}
        traced_futures: dict[str, dict[tuple[str, Any, int], Future]] = {}
        for k, c in enumerate(conditions):
            if k + 1 < len(conditions):
                teachers_of(conditions[k + 1])
            evaluated = [*methods, *([RELABELLED] if c.teacher == ALL_PAIRS and "dpo" in methods else [])]
            futures[c.name] = {(m, seed): student(c, m, chosen[m], seed, root / c.name / f"seed_{seed}" / m, families)
                               for seed in seeds[:c.seeds] for m in evaluated}
            if frontier and c.name in traced_on:
                traced_futures[c.name] = {
                    key: student(c, key[0], setting, key[2], folder, families)
                    for key, (folder, setting) in traced_cells(root, c, frontier, chosen, traced_seeds).items()}
        results = {name: {k: f.result() for k, f in fs.items()} for name, fs in futures.items()}
        traced = {name: {k: f.result() for k, f in fs.items()} for name, fs in traced_futures.items()}
        teacher_sets = {key: f.result() for key, f in teacher_futures.items()}
        reference = start.result()["scores"]

    text = report(results, teacher_sets, reference, traced)
    (root / "timing.json").write_text(json.dumps({"seconds_this_invocation": time.perf_counter() - began,
                                                  "jobs": jobs, "threads": threads}))
    return text


def _with_relabelled(chosen: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The chosen settings with ``dpo_relabelled``'s: DPO's."""
    return {**chosen, **({RELABELLED: chosen["dpo"]} if "dpo" in chosen else {})}


def _traced_specs(c: Condition, frontier: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
    """The frontier of a condition's methods: ``dpo_relabelled`` follows ``dpo`` where it runs (the all-pairs arm)."""
    return {**frontier, **({RELABELLED: frontier["dpo"]} if c.teacher == ALL_PAIRS and "dpo" in frontier else {})}


def knobs_of(frontier: dict[str, dict[str, list]]) -> dict[str, str]:
    """The knob each method is traced along (``dpo_relabelled``'s too)."""
    specs = {**frontier, **({RELABELLED: frontier["dpo"]} if "dpo" in frontier else {})}
    return {m: next(iter(spec)) for m, spec in specs.items()}


def traced_cells(root: Path, c: Condition, frontier: dict[str, dict[str, list]], chosen: dict[str, dict[str, Any]],
                 seeds: list[int]) -> dict[tuple[str, Any, int], tuple[Path, dict[str, Any]]]:
    """The frontier's cells on ``c``, seed by seed: (method, knob value, seed) -> (folder, setting), each
    setting a method's chosen one with the knob at a value of :func:`frontier.points_of`."""
    plan = {}
    for seed in seeds:
        for method, spec in _traced_specs(c, frontier).items():
            knob, values = points_of(spec, chosen.get(method, {}))
            for value in values:
                plan[(method, value, seed)] = (root / c.name / "frontier" / method / setting_name({knob: value}) / f"seed_{seed}",
                                               {**chosen.get(method, {}), knob: value})
    return plan


def _tune(root: Path, cells: Cells, tuned_on: Condition, conditions: list[Condition], methods: dict[str, list[str]],
          grid: dict[str, dict[str, list]], learning_rates: list[float], search: str, max_grid_extensions: int,
          extend_knobs: bool, families: dict[str, EvalSettings], val_data: str, policy: str, eval_prompts: str,
          num_tuning_prompts: int, min_distinct_ratio: float, max_kl: float | None, distill_tolerance: float | None,
          tuning_seed: int, teachers_of, student_data, student) -> dict[str, dict[str, Any]]:
    """Every method's :class:`tuning.Search` on ``tuned_on`` with one seed, the methods' passes side by
    side; writes ``tuning.md``/``tuning.csv`` and ``chosen.json`` and returns each method's chosen setting."""
    prompts = tuning_prompts(val_data, eval_prompts, root / "tuning_prompts.jsonl", num_tuning_prompts)
    tuning = {IN_DISTRIBUTION: replace(families[IN_DISTRIBUTION], prompts=str(prompts), num_prompts=None)}
    # The diversity floor of the tuning: a share of the starting policy's distinct-2 on the tuning prompts.
    start = cells.judge(root / "start" / "tuning", policy, tuning).result()
    floor = min_distinct_ratio * start["scores"][IN_DISTRIBUTION][DISTINCT]["mean"]
    # The next teacher set trains beside the tuning condition's (one set ahead, so the cells of a
    # condition never wait behind every teacher of the protocol).
    teachers_of(tuned_on)
    teachers_of(next((c for c in conditions if c.teacher_key() != tuned_on.teacher_key()), tuned_on))
    margins = teacher_margins(student_data(tuned_on))

    searches = {m: Search(grid.get(m, {}), learning_rates, search, max_grid_extensions, extend_knobs) for m in methods}
    runs: dict[str, dict[str, tuple[dict, Future]]] = {m: {} for m in methods}
    entries: dict[str, dict[str, dict]] = {m: {} for m in methods}

    def entry(m: str, name: str) -> dict:
        if name not in entries[m]:
            setting, future = runs[m][name]
            entries[m][name] = tuned_entry(setting, future.result()["scores"], margins)
        return entries[m][name]

    pending = {m: s.settings() for m, s in searches.items()}
    while pending:  # every method's next settings run side by side, then each method takes its next step
        for m, settings in pending.items():
            for s in settings:
                if (name := setting_name(s)) not in runs[m]:
                    runs[m][name] = (s, student(tuned_on, m, s, tuning_seed, root / "tuning" / m / name, tuning))
        following = {m: searches[m].advance(choose([entry(m, setting_name(s)) for s in settings], floor, distill_tolerance,
                                                   max_kl)["setting"]) for m, settings in pending.items()}
        pending = {m: settings for m, settings in following.items() if settings is not None}
    tuned = {m: [entry(m, name) for name in runs[m]] for m in methods}
    chosen = {m: s.center for m, s in searches.items()}
    (root / "tuning.md").write_text(tuning_table(tuned, chosen, floor, start["scores"][IN_DISTRIBUTION], max_kl) + "\n")
    write_csv([{"method": m, "setting": setting_name(e["setting"]), **{k: v for k, v in e.items() if k != "setting"}}
               for m, es in tuned.items() for e in es], root / "tuning.csv")
    record = root / "chosen.json"
    if record.is_file() and json.loads(record.read_text()) != chosen:
        raise UserError(f"{root}: the settings chosen now, {chosen}, differ from those its evaluation cells were "
                        f"trained with ({record}); give a new --out")
    record.write_text(json.dumps(chosen, indent=1))
    return chosen


def finished(root: Path, conditions: list[Condition], methods: list[str], seeds: list[int], train_data: str,
             val_data: str, teachers_out: str | None,
             given_oracle: str | None) -> tuple[dict[str, dict[tuple[str, int], dict]], dict[str, dict]]:
    """The cells and teacher sets already finished under ``root`` (their ``scores.json``/``teachers.json``)."""
    results = {}
    for c in conditions:
        files = {(m, seed): root / c.name / f"seed_{seed}" / m / "scores.json" for seed in seeds[:c.seeds] for m in methods}
        results[c.name] = {k: json.loads(f.read_text()) for k, f in files.items() if f.is_file()}
    teacher_sets = {}
    for key in dict.fromkeys(c.teacher_key() for c in conditions):
        record = Path(teachers_out or root) / "teachers" / key / "teachers.json"
        if key == GIVEN:
            teacher_sets[key] = given_teachers(train_data, val_data, given_oracle)
        elif record.is_file():
            teacher_sets[key] = json.loads(record.read_text())
    return results, teacher_sets


def finished_traced(root: Path, c: Condition, frontier: dict[str, dict[str, list]], chosen: dict[str, dict[str, Any]],
                    seeds: list[int]) -> dict[tuple[str, Any, int], dict]:
    """The traced cells of ``c`` already finished under ``root`` (:func:`traced_cells`)."""
    folders = {key: folder for key, (folder, _) in traced_cells(root, c, frontier, chosen, seeds).items()}
    return {key: json.loads((folder / "scores.json").read_text()) for key, folder in folders.items()
            if (folder / "scores.json").is_file()}
