"""Statistics: bootstrap intervals, paired win rates, summaries, diversity, KL to a reference, and
ranking accuracy by margin bin."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, NamedTuple, Sequence

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


def divergence(records: list[dict], temperatures: Sequence[float], reference: str, **bootstrap) -> list[dict]:
    """KL(policy || ``reference``) per policy and temperature, and pooled (``all``): the mean over
    prompts of ``logp - reference_logp`` of the records (:func:`sampling.sample_and_score` with
    ``kl_reference``; temperature-1 log-probs of each policy's own samples, see
    :mod:`.divergence`), with a bootstrap interval over prompts. The pooled figure averages each
    prompt's temperatures first, as :func:`summarize` does.

    Rows have :func:`summarize`'s columns with ``statistic="kl"``, no judge and ``opponent=reference``;
    policies whose records carry no ``reference_logp`` are left out.
    """
    ratios: dict[str, dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if "logp" in r and "reference_logp" in r:
            ratios[r["policy"]][r["temperature"]][r["prompt_index"]] = r["logp"] - r["reference_logp"]
    rows = []
    for policy, by_t in ratios.items():
        prompts = sorted(by_t[temperatures[0]])
        table = np.array([[by_t[t][i] for t in temperatures] for i in prompts])  # [prompts, temperatures]
        columns = [(str(t), [k]) for k, t in enumerate(temperatures)] + [(ALL, list(range(len(temperatures))))]
        for temperature, cols in columns:
            estimate = bootstrap_mean(table[:, cols].mean(1), **bootstrap)
            rows.append({"judge": "", "policy": policy, "opponent": reference, "temperature": temperature,
                         "statistic": "kl", **estimate._asdict()})
    return rows


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``successes`` may hold halves, as
    ties counted half do); ``(nan, nan)`` when ``n`` is 0."""
    if n == 0:
        return math.nan, math.nan
    z = float(np.sqrt(2) * _erfinv(level))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _erfinv(y: float) -> float:
    """The inverse error function, by Newton's method on ``math.erf`` (no SciPy needed)."""
    x = 0.0
    for _ in range(100):
        step = (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
        x -= step
        if abs(step) < 1e-15:
            break
    return x


def margin_bin_accuracy(
    gold_margins: Sequence[float],
    predictions: Mapping[str, Sequence[float]],
    bins: int = 5,
    level: float = 0.95,
) -> list[dict]:
    """Each ranker's accuracy against the gold sign, by bin of |gold margin|.

    Args:
        gold_margins: Per pair, the gold reward of the chosen response minus the rejected one's
            (its sign is the truth; its size, how clear the pair is).
        predictions: Ranker name -> per-pair predicted margin, chosen minus rejected (e.g. DRDO's
            reward-head difference, a log-prob margin ``z_w - z_l``, an implicit-reward difference).
        bins: Number of quantile bins of |gold margin|.
        level: Level of the Wilson intervals.

    Pairs are sorted by |gold margin| (ties in input order) and cut into ``bins`` bins of equal size
    (sizes differ by at most one, the larger first: ``numpy.array_split``), so bin 0 holds the
    nearest ties and the last the clearest pairs. A pair whose gold margin is exactly 0 has no
    gold sign: it is left out before binning (and counted in ``excluded`` of every row). A ranker
    is right on a pair when its predicted margin has the gold sign; a predicted margin of exactly 0
    (a tie) counts as half right.

    Returns one row per bin and ranker, bins in order: ``bin`` (0-based), ``low``/``high`` (the
    smallest and largest |gold margin| in the bin), ``ranker``, ``n`` (pairs), ``correct`` (right
    pairs, ties as halves), ``ties``, ``accuracy`` = correct / n, ``ci_low``/``ci_high`` (Wilson
    interval), ``excluded``.
    """
    gold = np.asarray(gold_margins, dtype=float)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    scores = {name: np.asarray(values, dtype=float) for name, values in predictions.items()}
    for name, values in scores.items():
        if values.shape != gold.shape:
            raise ValueError(f"ranker {name!r} has {values.size} predictions for {gold.size} pairs")
    keep = np.flatnonzero(gold != 0)
    excluded = int(gold.size - keep.size)
    if keep.size < bins:
        raise ValueError(f"{keep.size} pairs with a nonzero gold margin cannot fill {bins} bins")
    order = keep[np.argsort(np.abs(gold[keep]), kind="stable")]
    rows = []
    for b, members in enumerate(np.array_split(order, bins)):
        magnitude = np.abs(gold[members])
        sign = np.sign(gold[members])
        for name, values in scores.items():
            predicted = np.sign(values[members])
            ties = int((predicted == 0).sum())
            correct = float((predicted == sign).sum() + 0.5 * ties)
            low, high = wilson_interval(correct, members.size, level)
            rows.append({"bin": b, "low": float(magnitude.min()), "high": float(magnitude.max()), "ranker": name,
                         "n": int(members.size), "correct": correct, "ties": ties,
                         "accuracy": correct / members.size, "ci_low": low, "ci_high": high, "excluded": excluded})
    return rows


def lookup(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in where.items())), None)
