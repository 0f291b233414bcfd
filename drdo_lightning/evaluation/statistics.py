"""Statistics: bootstrap intervals, paired win rates, summaries, diversity."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Sequence

import numpy as np

ALL = "all"  # the "temperature" of estimates pooled over every temperature

# judge name -> policy name -> rewards [prompts, temperatures]
Scores = dict[str, dict[str, np.ndarray]]

class Estimate(NamedTuple):
    value: float
    low: float
    high: float


def bootstrap_mean(values: Sequence[float], *, samples: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of per-prompt values with a percentile-bootstrap interval (prompts resampled with replacement).

    With one prompt, or equal values, the interval collapses to the mean.
    """
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(values.mean()), float(low), float(high))


def paired_comparison(a: np.ndarray, b: np.ndarray, **bootstrap) -> dict[str, Estimate]:
    """Win, tie and loss rates of policy A over B from rewards ``[prompts, temperatures]``.

    ``win`` = P(r_A > r_B), ``tie`` = P(r_A = r_B), ``loss`` = P(r_A < r_B), over the cells of
    the same prompt and temperature. ``win_rate`` = win + tie / 2 (a tie counts half, so two
    identical policies score 50%). Intervals resample prompts, keeping each prompt's
    temperatures together.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    win, tie = (a > b).mean(axis=1), (a == b).mean(axis=1)
    return {
        "win": bootstrap_mean(win, **bootstrap),
        "tie": bootstrap_mean(tie, **bootstrap),
        "loss": bootstrap_mean(1.0 - win - tie, **bootstrap),
        "win_rate": bootstrap_mean(win + tie / 2, **bootstrap),
    }


def summarize(scores: Scores, temperatures: Sequence[float], *, baseline: str | None = None, **bootstrap) -> list[dict]:
    """Every estimate as a flat row: ``judge, policy, opponent, temperature, statistic, value, low, high``.

    Statistics, per judge and per temperature (and pooled over all, ``temperature="all"``):
    ``mean_reward``; ``advantage`` = mean of r(policy) - r(baseline) on the same prompts (when
    ``baseline`` is one of the policies); ``win``/``tie``/``loss``/``win_rate`` of every
    policy against every other (:func:`compare`).
    """
    columns = [(str(t), [i]) for i, t in enumerate(temperatures)] + [(ALL, list(range(len(temperatures))))]
    rows = []

    def add(judge, policy, opponent, temperature, statistic, estimate: Estimate) -> None:
        rows.append({"judge": judge, "policy": policy, "opponent": opponent, "temperature": temperature,
                     "statistic": statistic, **estimate._asdict()})

    for judge, by_policy in scores.items():
        for temperature, cols in columns:
            for name, rewards in by_policy.items():
                add(judge, name, "", temperature, "mean_reward", bootstrap_mean(rewards[:, cols].mean(1), **bootstrap))
                if baseline in by_policy and name != baseline:
                    gap = (rewards - by_policy[baseline])[:, cols].mean(1)
                    add(judge, name, baseline, temperature, "advantage", bootstrap_mean(gap, **bootstrap))
                for other, other_rewards in by_policy.items():
                    if other != name:
                        for statistic, estimate in paired_comparison(rewards[:, cols], other_rewards[:, cols], **bootstrap).items():
                            add(judge, name, other, temperature, statistic, estimate)
    return rows


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all word n-grams of ``texts``, pooled.

    1.0 when no n-gram repeats; a policy that answers every prompt with the same sentence scores
    near 1/len(texts). Texts shorter than ``n`` words add nothing; with no n-gram at all it is 0.
    """
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity(records: list[dict], temperatures: Sequence[float]) -> list[dict]:
    """Distinct-2 of each policy's generations per temperature, and its mean over temperatures (``all``).

    Rows have :func:`summarize`'s columns with ``statistic="distinct_2"``, no judge and no interval.
    """
    texts: dict[tuple[str, float], list[str]] = defaultdict(list)
    for r in records:
        texts[r["policy"], r["temperature"]].append(r["response"])
    rows = []
    for policy in dict.fromkeys(r["policy"] for r in records):
        values = [distinct_n(texts[policy, t]) for t in temperatures]
        for temperature, value in [*zip(map(str, temperatures), values), (ALL, float(np.mean(values)))]:
            rows.append({"judge": "", "policy": policy, "opponent": "", "temperature": temperature,
                         "statistic": "distinct_2", "value": value, "low": None, "high": None})
    return rows


def lookup(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in where.items())), None)
