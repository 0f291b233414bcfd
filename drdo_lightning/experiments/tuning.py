"""The protocol's tuning rule: the settings each method tries, and the choice among them.

A setting is ``{"model.learning_rate": lr, <knob>: value, ...}``; the knob :data:`VARIANT` names a
layer under ``configs/ablations/`` (a form of DRDO's loss) instead of a config key. A :class:`Search`
says which settings a method runs next: the whole grid (every learning rate times every value of
its knobs), or one axis at a time (:data:`COORDINATES`), where a full grid is too dear. Either way an
axis whose choice sits at the edge of the values tried grows past it (:func:`sweeps.beyond_edge`).
"""

from __future__ import annotations

from itertools import product
from typing import Any

import numpy as np

from drdo_lightning.evaluation.margins import REWARD_HEAD
from drdo_lightning.experiments.sweeps import DISTINCT, KL, beyond_edge, ladder_step
from drdo_lightning.recipes import config_path, read_config

LEARNING_RATE = "model.learning_rate"
PAPER_FORM = "paper"  # the ``variant`` value that adds no ablation layer: Eq. 6 as printed
VARIANT = "variant"  # grid key naming a layer under configs/ablations/ instead of a config key
CORRELATION = "reward_corr"  # a reward head's margin correlation with its teacher's, reported like a measure
GRID, COORDINATES = "grid", "coordinates"  # the searches of :class:`Search`
SEARCHES = (GRID, COORDINATES)


def settings_of(grid: dict[str, list], learning_rates: list[float]) -> list[dict[str, Any]]:
    """Every combination of a learning rate and the grid's knob values, as ``{key: value}`` dicts."""
    return Search(grid, learning_rates).settings()


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


def reads_scores(recipe: tuple[str, ...]) -> bool:
    """Whether a recipe's student reads the teachers' scores (a layer sets ``data.chosen_score_column``):
    one that does not trains the same on the same pairs whichever teachers scored them."""
    return any((read_config(layer).get("data") or {}).get("chosen_score_column") for layer in recipe)


def trains_online(recipe: tuple[str, ...]) -> bool:
    """Whether a recipe's student trains online (a layer sets ``model.init_args.online`` or
    ``data.prompts_only``): it samples its own pairs and learns from the Oracle it is given as judge,
    reading only the prompts of its pairs file."""
    configs = [read_config(layer) for layer in recipe]
    return any(((c.get("model") or {}).get("init_args") or {}).get("online") or (c.get("data") or {}).get("prompts_only")
               for c in configs)


def extensible(values: list) -> bool:
    """Whether an axis can grow past its edge: positive numbers only (a form or a switch has no next value)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)


class Search:
    """One method's tuning as passes over its axes (the learning rate and the knobs of its ``grid``).

    ``grid``: one pass, every learning rate times every knob value. ``coordinates``: the learning
    rates at each knob's first value (list the recipe's own first), then each knob in the grid's
    order at the choice so far, then the learning rate again at the ladder's neighbours of its choice
    (:func:`sweeps.ladder_step`): a descent that runs the sum of the axes' sizes, not their product.
    Within a pass, an axis whose choice sits at the edge of the values it tried grows one ladder step
    past it (:func:`sweeps.beyond_edge`), at most ``max_extensions`` steps: the learning rate always,
    a knob of positive numbers (:func:`extensible`) with ``extend_knobs``.

    :meth:`settings` are the pass's settings (some may have run already); :meth:`advance` takes the
    pass's choice and returns the next settings, or None when the search is over; :attr:`center` is
    then the chosen setting.
    """

    def __init__(self, grid: dict[str, list], learning_rates: list[float], search: str = GRID,
                 max_extensions: int = 2, extend_knobs: bool = False) -> None:
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, not {search!r}")
        self.axes = {LEARNING_RATE: list(learning_rates), **{k: list(v) for k, v in grid.items()}}
        self.passes = [list(self.axes)] if search == GRID else [[LEARNING_RATE], *([k] for k in grid), [LEARNING_RATE]]
        self.grows = {a for a, v in self.axes.items() if extensible(v) and (a == LEARNING_RATE or extend_knobs)}
        self.max_extensions = max_extensions
        self.center = {a: v[0] for a, v in self.axes.items()}
        self._open(0)

    def _open(self, index: int) -> None:
        self.index = index
        refine = index > 0 and self.passes[index] == [LEARNING_RATE]  # coordinates' last pass
        rate = self.center[LEARNING_RATE]
        self.values = {a: [ladder_step(rate, up=False), rate, ladder_step(rate, up=True)] if refine
                       else list(self.axes[a]) for a in self.passes[index]}
        self.extensions = dict.fromkeys(self.values, 0)

    def settings(self) -> list[dict[str, Any]]:
        """The pass's settings: every combination of its axes' values, the other axes at the choice so far."""
        return [{**self.center, **dict(zip(self.values, combo))} for combo in product(*self.values.values())]

    def advance(self, chosen: dict[str, Any]) -> list[dict[str, Any]] | None:
        """After the pass's choice ``chosen``: the pass grown past the edges ``chosen`` sits on, else
        the next pass's settings, else None (the search is over, ``chosen`` its result)."""
        grown = False
        for axis, values in self.values.items():
            step = beyond_edge(chosen[axis], values) if axis in self.grows else None
            if step is not None and self.extensions[axis] < self.max_extensions:
                values.append(step)
                self.extensions[axis] += 1
                grown = True
        if grown:
            return self.settings()
        self.center = dict(chosen)
        if self.index + 1 == len(self.passes):
            return None
        self._open(self.index + 1)
        return self.settings()


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
    settings minus ``tolerance`` (a setting without a variant or a correlation, or whose paper form
    was not tried among ``tuned``, has nothing to meet)."""
    if VARIANT not in entry["setting"] or CORRELATION not in entry:
        return True
    paper = next((e for e in tuned if e["setting"] == {**entry["setting"], VARIANT: PAPER_FORM}), None)
    return paper is None or entry[CORRELATION] >= paper[CORRELATION] - tolerance


def choose(tuned: list[dict], floor: float, tolerance: float | None, max_kl: float | None = None) -> dict:
    """The tuned entry with the highest mean gold reward among those that qualify: their distinct-2
    reaches ``floor`` (the gold reward alone rewards a policy that repeats one sentence it likes),
    with a ``max_kl`` their KL to the start is at most that many nats (far from the start a policy can
    write a salad of the judge's favourite words, diverse enough for the floor), and, with a
    ``tolerance``, a DRDO form still distils (:func:`_distils`). The most diverse entry if none
    qualifies (a collapsed grid is then visible in ``tuning.md``)."""
    qualified = [e for e in tuned if e[DISTINCT] >= floor and (max_kl is None or e[KL] <= max_kl)
                 and (tolerance is None or _distils(e, tuned, tolerance))]
    if not qualified:
        return max(tuned, key=lambda e: e[DISTINCT])
    return max(qualified, key=lambda e: e["gold"])
