"""Shared pieces of the sweeps: evaluation settings, one cell (train, then judge), intervals over seeds,
the worker pool and the tuning ladder's steps past a grid's edge."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import time
from collections import defaultdict
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

from drdo_lightning.data.readers import read_rows
from drdo_lightning.embedded_default import EMBEDDED, EVAL_PROMPTS, GOLD, OOD_PROMPTS
from drdo_lightning.errors import UserError
from drdo_lightning.evaluation.judges import Judge, load_judge
from drdo_lightning.evaluation.sampling import PAPER_TEMPERATURES, read_prompts, sample_and_score
from drdo_lightning.evaluation.statistics import Estimate, distinct_n
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.training import DataSpec, RunSpec, run_fit

log = logging.getLogger(__name__)

SEEDS = (0, 1, 2)
# The noisy subset of a condition is the same for every seed (``--data.seed``), so the teachers trained
# on it serve all seeds; seeds vary the training itself (data order, reward-head init).
FLIP_SEED = 0
STUDENTS = ("drdo", "dpo", "ipo", "edpo")  # the paper's students
DISTINCT = "distinct_2"  # reported next to the judges' rewards: the diversity of the generations
KL = "kl"  # with EvalSettings.kl_reference: KL(policy || reference) on the policy's own samples


@dataclass
class EvalSettings:
    """How every trained policy of a sweep is judged (see :func:`evaluation.sample_and_score`).

    The defaults fit the embedded default: its responses are at most ~35 tokens.
    ``max_prompt_length`` and ``max_length`` are the token budgets of the whole sweep: training,
    scoring and judging.
    ``prompts`` are the embedded default's held-out prompts; its out-of-distribution family,
    :data:`OOD_PROMPTS` (``embedded_default/data/eval_ood.jsonl``), is one option away:
    :meth:`ood`, or ``--evaluation.prompts embedded_default/data/eval_ood.jsonl`` on a sweep's command line.
    ``kl_reference`` (e.g. the SFT policy) adds ``kl``: KL(policy || reference) on the policy's own
    samples (:mod:`evaluation.divergence`), the measure a repetitive policy cannot game.
    ``keep_prompt_rewards`` keeps each judge's rewards per prompt and temperature (``by_prompt``),
    for paired win rates between policies.
    """

    prompts: str = EVAL_PROMPTS
    num_prompts: int | None = None
    judges: dict[str, str] = field(default_factory=lambda: {"gold": GOLD, "oracle": str(EMBEDDED / "oracle")})
    temperatures: list[float] = field(default_factory=lambda: list(PAPER_TEMPERATURES))
    top_p: float = 0.8
    max_new_tokens: int = 48
    max_prompt_length: int = 64
    max_length: int = 128
    batch_size: int = 50
    seed: int = 0
    kl_reference: str | None = None
    keep_prompt_rewards: bool = False

    def data_spec(self) -> DataSpec:
        return DataSpec(max_prompt_length=self.max_prompt_length, max_length=self.max_length)

    def ood(self) -> EvalSettings:
        """These settings on the embedded default's out-of-distribution prompts."""
        return replace(self, prompts=OOD_PROMPTS)


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
        """Mean reward per judge, over all prompts and temperatures and per temperature; the
        generations' diversity (``distinct_2``, :func:`evaluation.distinct_n`), per temperature and its
        mean; with ``kl_reference``, ``kl`` likewise (the mean over prompts of the summed log-ratio);
        with ``keep_prompt_rewards``, each judge's ``by_prompt`` rewards ``[prompts][temperatures]``."""
        s = self.settings
        records, scores = sample_and_score(
            {"policy": str(policy)}, self.prompts, self.judges, temperatures=s.temperatures, top_p=s.top_p,
            max_new_tokens=s.max_new_tokens, max_prompt_length=s.max_prompt_length, batch_size=s.batch_size, seed=s.seed,
            kl_reference=s.kl_reference,
        )
        measures = {judge: {"mean": float(by_policy["policy"].mean()),
                            "by_temperature": by_policy["policy"].mean(axis=0).tolist()}
                    for judge, by_policy in scores.items()}
        if s.keep_prompt_rewards:
            for judge, by_policy in scores.items():
                measures[judge]["by_prompt"] = by_policy["policy"].tolist()
        distinct = [distinct_n([r["response"] for r in records if r["temperature"] == t]) for t in s.temperatures]
        measures[DISTINCT] = {"mean": statistics.fmean(distinct), "by_temperature": distinct}
        if s.kl_reference is not None:
            kl = [statistics.fmean(r["logp"] - r["reference_logp"] for r in records if r["temperature"] == t)
                  for t in s.temperatures]
            measures[KL] = {"mean": statistics.fmean(kl), "by_temperature": kl}
        return measures


def run_cell(root: Path, evaluator: Evaluator | None, run: RunSpec | None, policy: str | None = None) -> dict[str, Any]:
    """Train ``run`` into ``root`` (or take ``policy`` as is, recorded as the result's ``policy``) and
    evaluate the result.

    A finished cell (``root/scores.json``) is read back (``evaluator`` may then be None); an
    unfinished one is wiped and redone, so a resumed sweep never mixes two runs' logs.
    """
    done = root / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = time.perf_counter()
    export = run_fit(replace(run, run_dir=root)).export_dir if run is not None else Path(policy)
    trained = time.perf_counter()
    result = {"scores": evaluator(export), "train_seconds": trained - start, "eval_seconds": time.perf_counter() - trained,
              **({"policy": str(policy)} if run is None else {})}
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


def aggregate(cells: list[dict], group: Sequence[str], value: str = "reward") -> list[dict]:
    """Per ``group`` values: the mean of ``value`` over the cells (the seeds) with its 95% t-interval."""
    by_key: dict[tuple, list[float]] = defaultdict(list)
    for cell in cells:
        by_key[tuple(cell[k] for k in group)].append(cell[value])
    return [{**dict(zip(group, key)), "seeds": len(values), **seed_interval(values)._asdict()}
            for key, values in by_key.items()]


def measure_label(name: str) -> str:
    """What a column of a sweep's tables measures: a judge's reward, or the generations' diversity."""
    if name == KL:
        return "KL to the starting policy (nats, on own samples)"
    return "distinct-2 of the generations" if name == DISTINCT else f"{name} reward"


def result_cells(result: dict, **labels) -> list[dict]:
    return [{**labels, "judge": judge, "reward": s["mean"]} for judge, s in result["scores"].items()]


def cell_text(row: dict | None) -> str:
    if row is None:
        return "-"
    if math.isnan(row["low"]):
        return f"{row['value']:+.3f}"
    return f"{row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class _InProcess(Executor):
    """Runs each job when it is submitted: ``jobs=1`` without worker processes."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def executor(jobs: int, threads: int) -> Executor:
    """``jobs`` worker processes of ``threads`` torch threads each; runs in this process for ``jobs=1``."""
    if jobs == 1:
        return _InProcess()
    # Threads are fixed before torch loads in each worker: OpenMP reads the variable once.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(threads,))


def ladder_step(value: float, up: bool) -> float:
    """The next value of the 1-3-10 ladder above (``up``) or below ``value``: 1e-3 -> 3e-3 -> 1e-2
    upwards, 1e-4 -> 3e-5 -> 1e-5 downwards (a value off the ladder moves by the same factors, 3 or 10/3)."""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    step = value * (3.0 if mantissa < 3 else 10 / 3) if up else value / (10 / 3 if mantissa < 3 else 3.0)
    return float(f"{step:.3g}")  # 1e-2, not 0.009999999999999998: it names run folders


def beyond_edge(chosen: float, tried: list[float]) -> float | None:
    """The next value past the edge of ``tried`` that ``chosen`` sits on, or None if it is interior.

    A tuning grid whose best value is its largest (smallest) says nothing about larger (smaller)
    values, so the grid grows by one step of the ladder (:func:`ladder_step`). A one-value grid is its
    own edge both ways; it grows upwards.
    """
    if chosen == max(tried):
        return ladder_step(chosen, up=True)
    if chosen == min(tried):
        return ladder_step(chosen, up=False)
    return None


def tuning_prompts(pairs: str, exclude: str, out: Path, limit: int) -> Path:
    """The first ``limit`` distinct prompts of ``pairs`` that are not prompts of ``exclude``, as a prompt file."""
    excluded = {row["prompt"] for _, row in read_rows(exclude)}
    prompts = [p for p in dict.fromkeys(row["prompt"] for _, row in read_rows(pairs)) if p not in excluded][:limit]
    if not prompts:
        raise UserError(f"--val_data {pairs}: no prompt that is not also an evaluation prompt of {exclude}")
    write_jsonl(out, [{"prompt": p} for p in prompts])
    return out
