"""The protocol's tuning rule: a grid of settings per method, and the choice among them.

A setting is ``{"model.learning_rate": lr, <knob>: value, ...}``: every learning rate of the grid
times every value of the method's knobs (``grid``); the knob :data:`VARIANT` names a layer under
``configs/ablations/`` (a form of DRDO's loss) instead of a config key. The grid grows past the edge
its choice sits on (:func:`sweeps.beyond_edge`, in :func:`experiments.protocol.protocol`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from drdo_lightning.evaluation.margins import REWARD_HEAD
from drdo_lightning.experiments.sweeps import DISTINCT
from drdo_lightning.recipes import config_path

LEARNING_RATE = "model.learning_rate"
PAPER_FORM = "paper"  # the ``variant`` value that adds no ablation layer: Eq. 6 as printed
VARIANT = "variant"  # grid key naming a layer under configs/ablations/ instead of a config key
CORRELATION = "reward_corr"  # a reward head's margin correlation with its teacher's, reported like a measure


def settings_of(grid: dict[str, list], learning_rates: list[float]) -> list[dict[str, Any]]:
    """Every combination of a learning rate and the grid's knob values, as ``{key: value}`` dicts."""
    combos: list[dict[str, Any]] = [{LEARNING_RATE: lr} for lr in learning_rates]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def setting_name(setting: dict[str, Any]) -> str:
    """A setting as a folder and table name: ``learning_rate=0.001,beta=0.1`` (the recipe's own settings: ``recipe``)."""
    return ",".join(f"{k.removeprefix('model.')}={v}" for k, v in setting.items()) or "recipe"


def recipe_of(layers: list[str], setting: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A method's recipe layers with a setting's :data:`VARIANT` layer on top, and the options it sets.
    The first layer is a recipe name; the others are paths of shipped layers (``ablations/...``)."""
    knobs = {k: v for k, v in setting.items() if k != VARIANT}
    variant = setting.get(VARIANT, PAPER_FORM)
    extra = [*layers[1:], *([f"ablations/{variant}"] if variant != PAPER_FORM else [])]
    return (layers[0], *(str(config_path(layer)) for layer in extra)), knobs


def margin_correlation(student: list[float], teacher: list[float]) -> float:
    """Pearson correlation of a student's reward margins r(x, y_w) - r(x, y_l) with its teacher's on the
    same pairs: how well the student distils."""
    return float(np.corrcoef(student, teacher)[0, 1])


def tuned_entry(setting: dict[str, Any], scores: dict[str, Any], teacher_margins: list[float] | None) -> dict[str, Any]:
    """A tuning cell as the choice reads it: its setting, each measure's mean on the tuning prompts,
    and, for a model with a reward head, :data:`CORRELATION` with ``teacher_margins``."""
    entry = {"setting": setting, **{k: v["mean"] for k, v in scores["in"].items()}}
    margins = scores.get("margins", {})
    if REWARD_HEAD in margins and teacher_margins is not None:
        entry[CORRELATION] = margin_correlation(margins[REWARD_HEAD], teacher_margins)
    return entry


def _distils(entry: dict, tuned: list[dict], tolerance: float) -> bool:
    """Whether a DRDO form still distils: its correlation at least the paper form's at the same other
    settings minus ``tolerance`` (a setting without a variant or a correlation has nothing to meet)."""
    if VARIANT not in entry["setting"] or CORRELATION not in entry:
        return True
    paper = next(e for e in tuned if e["setting"] == {**entry["setting"], VARIANT: PAPER_FORM})
    return entry[CORRELATION] >= paper[CORRELATION] - tolerance


def choose(tuned: list[dict], floor: float, tolerance: float | None) -> dict:
    """The tuned entry with the highest mean gold reward among those that qualify: their distinct-2
    reaches ``floor`` (the gold reward alone rewards a policy that repeats one sentence it likes) and,
    with a ``tolerance``, a DRDO form still distils (:func:`_distils`). The most diverse entry if none
    qualifies (a collapsed grid is then visible in ``tuning.md``)."""
    qualified = [e for e in tuned if e[DISTINCT] >= floor and (tolerance is None or _distils(e, tuned, tolerance))]
    if not qualified:
        return max(tuned, key=lambda e: e[DISTINCT])
    return max(qualified, key=lambda e: e["gold"])
