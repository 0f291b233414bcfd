"""The cells of a protocol run: train a student, judge it, keep its margins; and never do one twice.

A cell (:func:`sweeps.run_cell`) trains one run into its folder and judges the export on each prompt
family (:class:`CellEvaluator`). :class:`Cells` hands every cell of a run to the worker pool, keyed by
what it trains (:func:`training_key`) and how it is judged: a cell identical to one already asked for
is that one's result, copied into its own folder (``same_as``); a cell that trains the same as a
finished one but is judged otherwise (a tuning cell judged on the tuning prompts, asked for again by
the evaluation) judges that one's export instead of training again (``policy``). So the tuning, the
frontier and the evaluation share their identical cells, and so do two teacher arms for a student
that reads no teacher's scores.
"""

from __future__ import annotations

import json
from concurrent.futures import Executor, Future
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from drdo_lightning.evaluation.margins import pair_margins
from drdo_lightning.experiments.sweeps import EvalSettings, Evaluator, run_cell
from drdo_lightning.training import RunSpec

IN_DISTRIBUTION, OUT_OF_DISTRIBUTION = "in", "ood"  # a cell's prompt families
MARGINS = "margins"  # a cell's margins on the validation pairs, beside its prompt families
SAME_AS = "same_as"  # a copied cell's record of the cell it copies


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


def done(value: Any) -> Future:
    """A future that already holds ``value``."""
    future: Future = Future()
    future.set_result(value)
    return future


def training_key(run: RunSpec, pairs: str | None = None) -> str:
    """What a run trains, as a string two identical runs share (its folder left out). ``pairs``: the
    pairs its files hold, standing for the files themselves, for a student that reads no teacher's
    scores (its files differ between teacher arms only in the scores)."""
    fields = asdict(replace(run, run_dir=None))
    if pairs is not None:
        fields.update(train_file=pairs, val_file=pairs)
    return json.dumps(fields, sort_keys=True, default=str)


def _copied(source: Future, origin: Path, folder: Path) -> Future:
    """``source``'s result, written into ``folder`` once it is there, as a copy of ``origin`` that took no time."""
    future: Future = Future()

    def copy(finished: Future) -> None:
        try:
            result = {**finished.result(), "train_seconds": 0.0, "eval_seconds": 0.0, SAME_AS: str(origin)}
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "scores.json").write_text(json.dumps(result, indent=1))
            future.set_result(result)
        except BaseException as error:  # the source's failure is the copy's
            future.set_exception(error)

    source.add_done_callback(copy)
    return future


class Cells:
    """Every cell of one protocol run, submitted to ``pool`` at most once by what it trains and how it is judged.

    ``val_file`` and ``reference`` are the validation pairs the margins are taken on and the policy
    they are taken against (:class:`CellEvaluator`).
    """

    def __init__(self, pool: Executor, val_file: str, reference: str) -> None:
        self.pool, self.val_file, self.reference = pool, val_file, reference
        self.judged: dict[str, tuple[Path, Future]] = {}
        self.trained: dict[str, tuple[Path, Future]] = {}

    def judge(self, folder: Path, policy: str, families: dict[str, EvalSettings]) -> Future:
        """A policy as it is (the starting policy), judged into ``folder``."""
        return self.pool.submit(_cell, folder, None, families, self.val_file, self.reference, policy=policy)

    def submit(self, folder: Path, run: RunSpec, families: dict[str, EvalSettings], key: str) -> Future:
        """The cell of ``run`` (trained as ``key`` says, :func:`training_key`) judged on ``families`` in
        ``folder``: read back if finished there, else a copy of an identical cell, else a judgement of
        the export of a finished cell that trained the same, else trained."""
        judged = key + repr(families)
        finished = (folder / "scores.json").is_file()
        if not finished and judged in self.judged:
            return _copied(self.judged[judged][1], self.judged[judged][0], folder)
        origin, source = self.trained.get(key, (None, None))
        if (not finished and source is not None and source.done() and source.exception() is None
                and (origin / "export" / "config.json").is_file()):
            future = self.pool.submit(_cell, folder, None, families, self.val_file, self.reference,
                                      policy=str(origin / "export"))
        else:
            future = self.pool.submit(_cell, folder, run, families, self.val_file, self.reference)
            if not finished or (folder / "export").is_dir():  # a finished copy has no export to judge again
                self.trained.setdefault(key, (folder, future))
        self.judged.setdefault(judged, (folder, future))
        return future
