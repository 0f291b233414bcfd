"""The data of a protocol's conditions: how the training labels are made, and the teachers that score them.

A :class:`Condition` names a label-noise model (data options), optionally a half of the paper's
Table 1 (:func:`table1_splits`), and its teacher arm. A teacher set (:func:`teachers`) is an Oracle
and an e-DPO ensemble trained on a condition's noisy pairs, with the pairs they scored; or the
scores the data already carries and the Oracle that made them (:data:`GIVEN`); or the set an earlier run trained
(:func:`finished_teachers`). :func:`relabelled_by_teacher` orders pairs by their Oracle, for the control
``dpo_relabelled``.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drdo_lightning.data.noise import against_margin_indices, flip_rows
from drdo_lightning.data.readers import read_rows
from drdo_lightning.data.splits import splits
from drdo_lightning.data.tokenization import load_tokenizer
from drdo_lightning.embedded_default import task
from drdo_lightning.errors import MissingPathError, UserError
from drdo_lightning.experiments.sweeps import FLIP_SEED
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.stages import oracle_accuracy, score_with_judges, train_judges_and_score, train_sft
from drdo_lightning.training import DataSpec, RunSpec

log = logging.getLogger(__name__)

GOLD_COLUMNS = ["gold_chosen", "gold_rejected"]
# The teacher arms of a condition: teachers of its own pairs, one set of all pairs, or the data's own scores.
OWN, ALL_PAIRS, GIVEN = "own", "all_pairs", "given"
TEACHER_ARMS = (OWN, ALL_PAIRS, GIVEN)
SPLIT_FILES = {"easy": "hc_he", "hard": "lc_le", "sample": "all"}


@dataclass(frozen=True)
class Condition:
    """How one condition's training labels are made, and whose teachers its students distil.

    Attributes:
        name: Folder and table name.
        data: Data options of the label-noise model, e.g. ``{"label_noise": "bt", "noise_temperature": 2.0,
            "noise_score_columns": ["gold_chosen", "gold_rejected"]}`` or ``{"label_flip_rate": 0.2}``
            (docs/data.md, "Label noise").
        split: Train on one half of the paper's Table 1 instead of all pairs: ``easy`` (high confidence,
            high edit distance), ``hard`` (low, low) or ``sample`` (all pairs subsampled to the same size).
        teacher: ``own``: teachers trained on this condition's training pairs; ``all_pairs``: one set
            trained on every training pair with the data's own labels (the paper's setting for splits);
            ``given``: none trained, the Oracle and ensemble scores the pairs carry (a flip swaps them
            with the responses, so the distillation terms never see it: a clean-teacher bound).
        seeds: How many of the command's seeds this condition runs (None: all); fewer marks it secondary.
    """

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    teacher: str = OWN
    seeds: int | None = None

    def teacher_key(self) -> str:
        """The teacher set it distils: conditions of the ``all_pairs`` (``given``) arm share one."""
        return self.teacher if self.teacher in (ALL_PAIRS, GIVEN) else self.name


def as_condition(fields: dict[str, Any] | Condition) -> Condition:
    """A :class:`Condition` from its fields, with an error naming what is unknown, missing or misspelt."""
    if isinstance(fields, Condition):
        return fields
    known = set(Condition.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown or "name" not in fields:
        raise UserError(f"--conditions: {dict(fields)} has unknown fields {unknown} or no name; a condition has "
                        f"{sorted(known)}")
    c = Condition(**fields)
    if c.split is not None and c.split not in SPLIT_FILES:
        raise UserError(f"condition {c.name}: split must be one of {sorted(SPLIT_FILES)}, got {c.split!r}")
    if c.teacher not in TEACHER_ARMS:
        raise UserError(f"condition {c.name}: teacher must be one of {list(TEACHER_ARMS)}, got {c.teacher!r}")
    if c.teacher == GIVEN and c.split is not None:
        raise UserError(f"condition {c.name}: teacher {GIVEN} trains on the data as given, not on a split")
    return c


# ---------------------------------------------------------------------------------------
# The data of the conditions


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


def oracle_margins(scored: str | Path) -> list[float]:
    """``oracle_chosen - oracle_rejected`` of each pair of a scored file, in file order."""
    return [row["oracle_chosen"] - row["oracle_rejected"] for _, row in read_rows(str(scored))]


def relabelled_by_teacher(scored: Path, out: Path) -> Path:
    """``scored`` with each pair ordered by its Oracle's scores (chosen: the higher ``oracle_*``):
    the pairs :func:`data.noise.against_margin_indices` picks on the Oracle's margins are flipped,
    every ``*_chosen``/``*_rejected`` column with them; the count flipped is logged."""
    rows = [row for _, row in read_rows(str(scored))]
    swapped = flip_rows(rows, against_margin_indices([r["oracle_chosen"] - r["oracle_rejected"] for r in rows]))
    write_jsonl(out, rows)
    log.info("%s: %d of %d pairs reordered by the Oracle", out, swapped, len(rows))
    return out


# ---------------------------------------------------------------------------------------
# Teachers


def gold_accuracy(scored: Path | str, prefix: str = "oracle") -> float | None:
    """How often ``prefix``'s margin has the sign of the gold margin (pairs with a gold tie left out);
    None for pairs without gold scores."""
    rows = [r for _, r in read_rows(str(scored))]
    if any(c not in rows[0] for c in GOLD_COLUMNS):
        return None
    pairs = [(r[f"{prefix}_chosen"] - r[f"{prefix}_rejected"], r["gold_chosen"] - r["gold_rejected"]) for r in rows]
    return statistics.fmean((m > 0) == (g > 0) for m, g in pairs if g != 0)


def _count(path: str) -> int:
    return sum(1 for _ in read_rows(path))


def teachers(work: Path, train: str, val: str, policy: str, members: int, shared: RunSpec, selection: str,
             all_pairs: str | None = None, oracle_policy: str | None = None) -> dict[str, Any]:
    """The teacher set of one training file (trained unless ``work/teachers.json`` exists): the scored
    pairs (``train``, ``val``), the models (``oracle``, ``ensemble``), how each validated
    (``validation``) and the Oracle's accuracy on ``val``: against its labels and the gold sign.

    ``selection`` is where the teachers validate (:func:`stages.train_judges_and_score`);
    ``oracle_policy`` starts the Oracle from another SFT policy than the ensemble's ``policy``.
    ``all_pairs``: the file ``train`` is a subset of; its teachers then run as many more epochs as
    ``all_pairs`` has more pairs, so they get the step ceiling of teachers of all pairs (a split's
    teachers would otherwise stop after a quarter of the steps, before they learned anything)."""
    record = work / "teachers.json"
    if record.is_file():
        return json.loads(record.read_text())
    shutil.rmtree(work, ignore_errors=True)  # an interrupted set is redone whole, never mixed with a new one
    scale = _count(all_pairs) / _count(train) if all_pairs else 1.0
    judges = train_judges_and_score(work, {"train": Path(train), "val": Path(val)}, Path(policy), members, shared,
                                    oracle_policy=Path(oracle_policy) if oracle_policy else None, selection=selection,
                                    epochs_scale=scale)
    result = {"train": str(judges.scored["train"]), "val": str(judges.scored["val"]), "oracle": str(judges.oracle),
              "ensemble": [str(m) for m in judges.ensemble], "validation": judges.validation,
              "oracle_accuracy": oracle_accuracy(judges.scored["val"]),
              "oracle_gold_accuracy": gold_accuracy(judges.scored["val"])}
    record.write_text(json.dumps(result, indent=1))
    return result


def given_teachers(train: str, val: str, oracle: str | None) -> dict[str, Any]:
    """The teacher "set" of the data as given: the pairs and the Oracle scores they carry, and the
    Oracle that made them (``oracle``; None where it is not known); nothing trained."""
    return {"train": train, "val": val, "oracle": oracle}


def finished_teachers(out: str, key: str) -> dict[str, Any]:
    """The teacher set ``key`` that an earlier protocol run under ``out`` trained; it must be finished."""
    record = Path(out) / "teachers" / key / "teachers.json"
    if not record.is_file():
        raise MissingPathError(f"--teachers_from {out}: no finished teacher set {key!r} ({record} is missing); "
                               "that run has not trained it")
    return json.loads(record.read_text())


def scored_by(teacher: dict[str, Any], pairs: Path, out: Path, options: dict[str, Any]) -> str:
    """``pairs`` scored by another condition's teachers (the Oracle, then the ensemble)."""
    if not out.is_file():
        score_with_judges(teacher["oracle"], teacher["ensemble"], pairs, out, options)
    return str(out)


def oracle_sft_policy(root: Path, tokenizer_source: str, shape: dict[str, int], sft_data: str, val_data: str,
                      spec: DataSpec, overrides: dict[str, Any]) -> str:
    """An SFT policy for the Oracle to start from: a randomly initialised Llama of ``shape``
    (:data:`task.ORACLE_SHAPE`: larger than the students, as the paper's Oracle is as large as its
    students or larger), fine-tuned by the ``sft`` recipe, as ``build-embedded-default`` makes the shipped Oracle's."""
    base = root / "base_model"
    if not (base / "config.json").is_file():
        task.write_base_model(base, load_tokenizer(tokenizer_source), seed=FLIP_SEED, **shape)
    return str(train_sft(RunSpec("sft", run_dir=root / "sft", model=base, train_file=sft_data, val_file=val_data, data=spec,
                                 seed=FLIP_SEED, overrides=overrides)))
