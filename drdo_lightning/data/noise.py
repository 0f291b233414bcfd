"""Label noise: which pairs' labels a noise model flips, and flipping them in rows.

The models (docs/data.md, "Label noise") pick indices of the pairs ``0..n-1``: ``uniform``
(:func:`flip_indices`, an exact fraction at random), ``bt`` (:func:`bt_flip_indices`, every label
resampled from Bradley-Terry on the pair's margin) and ``low_margin``
(:func:`low_margin_flip_indices`, an exact fraction, the smallest |margin|);
:func:`against_margin_indices` picks the pairs a scorer ranks the other way (relabelling by a
teacher). The data module swaps the picked pairs as it tokenizes (``swap_pair`` of
:mod:`.pairs`); rows held as dicts (a generated task, a scored file) are flipped by :func:`flip_rows`.
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Sequence

LABEL_NOISE_MODELS = ("uniform", "bt", "low_margin")
CHOSEN, REJECTED = "chosen", "rejected"


def flip_indices(n: int, rate: float, seed: int | random.Random) -> list[int]:
    """The label-noise rule: exactly ``round(rate * n)`` of the indices ``0..n-1``, drawn without
    replacement by ``random.Random(seed)`` (or by ``seed`` itself, a ``Random``)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label_flip_rate must be in [0, 1], got {rate}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return rng.sample(range(n), round(rate * n))


def _sigmoid(x: float) -> float:
    """σ(x) = 1 / (1 + e^-x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def bt_flip_indices(margins: Sequence[float], temperature: float, seed: int | random.Random) -> list[int]:
    """Bradley-Terry label noise: every pair's label is resampled from its margin
    ``Δ_i`` (chosen minus rejected), the chosen response staying chosen with probability
    ``P(keep_i) = σ(s · Δ_i)``, so it is flipped with ``P(flip_i) = 1 − σ(s · Δ_i) = σ(−s · Δ_i)``
    (``s = temperature ≥ 0``: 0 makes every label a coin flip, a large ``s`` keeps every label that
    agrees with its margin's sign and flips every one that does not). One draw ``u_i`` of
    ``random.Random(seed)`` per pair, in order; pair ``i`` is flipped when ``u_i < σ(−s · Δ_i)``.
    Returns the flipped indices, ascending."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"noise_temperature must be a finite number >= 0, got {temperature}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return [i for i, margin in enumerate(margins) if rng.random() < _sigmoid(-temperature * margin)]


def low_margin_flip_indices(margins: Sequence[float], rate: float) -> list[int]:
    """Label noise where labels are least certain: exactly ``k = round(rate · n)`` of the ``n``
    pairs are flipped, those with the ``k`` smallest ``|Δ_i|`` (``Δ_i`` the margin, chosen minus
    rejected); pairs of equal ``|Δ|`` go in index order, so the choice is deterministic (no seed).
    Returns the flipped indices, ascending."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label_flip_rate must be in [0, 1], got {rate}")
    by_margin = sorted(range(len(margins)), key=lambda i: (abs(margins[i]), i))
    return sorted(by_margin[: round(rate * len(margins))])


def against_margin_indices(margins: Sequence[float]) -> list[int]:
    """The pairs whose label a scorer disagrees with: ``Δ_i < 0`` (its rejected response scores
    higher); a tie keeps its label. Flipping them orders every pair by the scorer, the limit of
    :func:`bt_flip_indices` as ``s → ∞`` without its coin flips at ``Δ = 0``. Ascending."""
    return [i for i, margin in enumerate(margins) if margin < 0]


def noise_flip_indices(model: str, n: int, *, rate: float = 0.0, margins: Sequence[float] | None = None,
                       temperature: float = 1.0, seed: int | random.Random = 0) -> list[int]:
    """The indices of ``0..n-1`` that label-noise ``model`` flips: ``uniform`` (:func:`flip_indices`,
    ``rate`` and ``seed``), ``bt`` (:func:`bt_flip_indices`, ``margins``, ``temperature`` and
    ``seed``) or ``low_margin`` (:func:`low_margin_flip_indices`, ``margins`` and ``rate``)."""
    if model == "uniform":
        return flip_indices(n, rate, seed)
    if model not in LABEL_NOISE_MODELS:
        raise ValueError(f"label_noise must be one of {list(LABEL_NOISE_MODELS)}, got {model!r}")
    if margins is None or len(margins) != n:
        raise ValueError(f"label_noise {model} needs one margin per pair ({n}), got {None if margins is None else len(margins)}")
    if model == "bt":
        return bt_flip_indices(margins, temperature, seed)
    return low_margin_flip_indices(margins, rate)


def _other_side(column: str) -> str | None:
    """``chosen`` <-> ``rejected``, ``<name>_chosen`` <-> ``<name>_rejected``; None for any other column."""
    for side, other in ((CHOSEN, REJECTED), (REJECTED, CHOSEN)):
        if column == side or column.endswith(f"_{side}"):
            return column[: len(column) - len(side)] + other
    return None


def swap_row(row: dict) -> dict:
    """``row`` with its label flipped: chosen and rejected swapped, and with them every column pair
    ``<name>_chosen``/``<name>_rejected`` (scores, ensemble lists), so each score stays with its response."""
    return {k: row[_other_side(k)] if _other_side(k) in row else v for k, v in row.items()}


def flip_rows(rows: list[dict], indices: Iterable[int], mark: str | None = None) -> int:
    """Flip the labels of ``rows`` at ``indices`` in place (:func:`swap_row`), setting the column
    ``mark`` (if given) to True on each; returns how many were flipped."""
    count = 0
    for i in indices:
        rows[i] = {**swap_row(rows[i]), **({mark: True} if mark else {})}
        count += 1
    return count
