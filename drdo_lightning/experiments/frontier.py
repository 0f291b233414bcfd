"""Every method at equal KL: its frontier along the knob that sets its distance from the start, read at
fixed KL levels, and the verdict of DRDO against the baselines.

A method is *traced* (``--frontier``) along one knob (DPO's ``model.beta``, IPO's ``model.tau``,
DRDO's ``model.alpha`` ...): its chosen setting with that knob at each listed value and at the tuned
one (:func:`points_of`), each point trained with the frontier's seeds on each traced condition. A
seed's *curve* is its points' (KL(π || π_SFT), gold reward) on the evaluation prompts, pooled over
temperatures as every table of the report is. :func:`read_at` reads a curve at a KL level by linear
interpolation between the two points that bracket it, and never outside the KL the curve spans. At
a level, a method's estimate is the mean over seeds of their readings with the 95% Student-t interval
of every other table (:func:`sweeps.seed_interval`); a method with a seed whose curve does not reach
the level has none there.

The verdict (:func:`verdict`) puts a method (each reading of DRDO) against each baseline: *ahead*
where its interval lies wholly above the baseline's, *behind* wholly below, *level* where they
overlap. Where both are traced it is read at each KL level both curves reach; elsewhere at the tuned
points (the evaluation's seeds), with each side's KL beside it, since those are not at equal KL.

Along the same curves the gold reward is also plotted against the Oracle's reward (the judge
:data:`ORACLE`): a method that over-optimises its proxy shows the gold reward falling as the
Oracle's rises (Gao et al. 2023, "Scaling laws for reward model overoptimization").
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from drdo_lightning.errors import UserError
from drdo_lightning.evaluation.statistics import ALL, Estimate
from drdo_lightning.experiments.cells import IN_DISTRIBUTION
from drdo_lightning.experiments.sweeps import DISTINCT, KL, cell_text, measure_label, seed_interval
from drdo_lightning.reports import markdown_table, new_figure, write_csv

log = logging.getLogger(__name__)

KL_LEVELS = (5.0, 10.0, 20.0, 40.0)
AHEAD, LEVEL, BEHIND = "ahead", "level", "behind"
GOLD = "gold"  # the judge every reading is of
ORACLE = "oracle"  # the judge the gold reward is also plotted against: the proxy the students learn from
SHORT_NAMES = {GOLD: "gold", DISTINCT: "distinct-2"}  # the measures read at equal KL, as table headers

# A traced condition's cells: (method, knob value, seed) -> cell (``scores.json``).
Traced = dict[tuple[str, Any, int], dict]


def check_frontier(frontier: dict[str, dict[str, list]], methods: Sequence[str], conditions: Sequence[str],
                   traced_on: Sequence[str]) -> None:
    """A frontier names one knob with its values per method of the run, on conditions of the run."""
    for method, spec in frontier.items():
        if method not in methods:
            raise UserError(f"--frontier: {method!r} is none of the methods {list(methods)}")
        if len(spec) != 1 or not all(isinstance(v, list) and v for v in spec.values()):
            raise UserError(f"--frontier.{method}: expected one knob and its values, e.g. "
                            f"{{model.beta: [0.03, 0.1, 0.3]}}; got {spec}")
    unknown = sorted(set(traced_on) - set(conditions))
    if unknown:
        raise UserError(f"--frontier_conditions: {unknown} are none of the conditions {list(conditions)}")


def points_of(spec: dict[str, list], chosen: dict[str, Any]) -> tuple[str, list]:
    """The knob a method is traced along and its values: the listed ones and the tuned one (whose
    cells are the evaluation's), in increasing order."""
    ((knob, values),) = spec.items()
    return knob, sorted(dict.fromkeys([*values, *([chosen[knob]] if knob in chosen else [])]))


def read_at(points: Sequence[tuple[float, float]], level: float) -> float | None:
    """The gold reward of a curve at KL = ``level``: the curve's ``(kl, gold)`` points in order of KL
    (along the knob wherever the KL rises with it, as it does but for the noise of a seed), linear
    between the two that bracket ``level``; the mean of the points exactly at ``level``; None where the
    curve never reaches it (below its least KL or above its largest): a reading is never extrapolated."""
    ordered = sorted(points)
    if not ordered or not ordered[0][0] <= level <= ordered[-1][0]:
        return None
    exact = [gold for kl, gold in ordered if kl == level]
    if exact:
        return statistics.fmean(exact)
    (kl0, gold0), (kl1, gold1) = next((a, b) for a, b in zip(ordered, ordered[1:]) if a[0] < level < b[0])
    return gold0 + (gold1 - gold0) * (level - kl0) / (kl1 - kl0)


def curves(cells: Traced, method: str, measure: str = GOLD) -> dict[int, list[tuple[float, float]]]:
    """Per seed, a method's curve: each traced point's (KL, ``measure``) on the evaluation prompts
    (the gold reward; or distinct-2, which a policy repeating what the judge likes cannot game)."""
    by_seed: dict[int, list[tuple[float, float]]] = {}
    for (m, _, seed), cell in cells.items():
        if m == method:
            scores = cell["scores"][IN_DISTRIBUTION]
            by_seed.setdefault(seed, []).append((scores[KL]["mean"], scores[measure]["mean"]))
    return by_seed


def at_level(by_seed: dict[int, list[tuple[float, float]]], level: float) -> Estimate | None:
    """The mean over seeds of their curves' readings at ``level`` with its 95% t-interval; None unless
    every seed's curve reaches it."""
    readings = [read_at(points, level) for points in by_seed.values()]
    if not readings or any(r is None for r in readings):
        return None
    return seed_interval(readings)


def verdict(method: Estimate | None, baseline: Estimate | None) -> str | None:
    """:data:`AHEAD` where ``method``'s interval lies above ``baseline``'s, :data:`BEHIND` below,
    :data:`LEVEL` where they overlap (or a single seed gives no interval); None without both."""
    if method is None or baseline is None:
        return None
    if method.low > baseline.high:
        return AHEAD
    if method.high < baseline.low:
        return BEHIND
    return LEVEL


# ---------------------------------------------------------------------------------------
# Tables and plot


def methods_of(cells: Traced) -> list[str]:
    return list(dict.fromkeys(m for m, _, _ in cells))


def equal_kl_rows(traced: dict[str, Traced], levels: Sequence[float], measure: str = GOLD) -> list[dict]:
    """Per traced condition, method and level: the estimate of ``measure`` (``value``, ``low``,
    ``high``; None where it has none) and how many seeds were read."""
    rows = []
    for condition, cells in traced.items():
        for method in methods_of(cells):
            by_seed = curves(cells, method, measure)
            for level in levels:
                estimate = at_level(by_seed, level)
                rows.append({"condition": condition, "method": method, "measure": measure, "kl": level,
                             "seeds": len(by_seed),
                             **(estimate._asdict() if estimate else dict.fromkeys(Estimate._fields))})
    return rows


def _mean_points(cells: Traced, method: str, measure: str = KL) -> list[tuple[Any, float, float]]:
    """Per traced point of ``method``, in order of its knob: the value and the mean over seeds of its
    ``measure`` (KL, or a judge's reward) and gold reward."""
    out = []
    for value in sorted({v for m, v, _ in cells if m == method}):
        scores = [c["scores"][IN_DISTRIBUTION] for (m, v, _), c in cells.items() if m == method and v == value]
        out.append((value, statistics.fmean(s[measure]["mean"] for s in scores),
                    statistics.fmean(s[GOLD]["mean"] for s in scores)))
    return out


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def equal_kl_table(traced: dict[str, Traced], knobs: dict[str, str], levels: Sequence[float],
                   measure: str = GOLD) -> str:
    """Per traced condition and method: the knob and values traced, the KL they span (means over
    seeds), and ``measure`` at each KL level (mean over seeds, 95% t-interval; - where not reached)."""
    estimates = {(r["condition"], r["method"], r["kl"]): r for r in equal_kl_rows(traced, levels, measure)}
    body = []
    for condition, cells in traced.items():
        for method in methods_of(cells):
            points = _mean_points(cells, method)
            traced_along = f"{knobs.get(method, '?').removeprefix('model.')} " + ", ".join(_value_text(v) for v, _, _ in points)
            span = f"{min(kl for _, kl, _ in points):.1f}-{max(kl for _, kl, _ in points):.1f}"
            readings = [estimates[(condition, method, level)] for level in levels]
            body.append([condition, method, traced_along, str(len(curves(cells, method))), span,
                         *(cell_text(r) if r["value"] is not None else "-" for r in readings)])
    return markdown_table(["condition", "method", "traced along", "seeds", "KL traced (nats)",
                           *(f"{SHORT_NAMES.get(measure, measure)} at KL {level:g}" for level in levels)], body)


def overoptimisation_table(traced: dict[str, Traced], knobs: dict[str, str]) -> str:
    """Per traced condition, method and value of its knob (in order): the means over seeds of KL, the
    Oracle's reward and the gold reward, side by side, so a gold reward that falls as the Oracle's
    rises (over-optimisation of the proxy) shows in the rows."""
    body = []
    for condition, cells in traced.items():
        for method in methods_of(cells):
            knob = knobs.get(method, "?").removeprefix("model.")
            by_oracle = _mean_points(cells, method, ORACLE)
            for (value, kl, gold), (_, oracle, _) in zip(_mean_points(cells, method), by_oracle):
                body.append([condition, method, f"{knob} {_value_text(value)}", f"{kl:.1f}", f"{oracle:+.3f}",
                             f"{gold:+.3f}"])
    return markdown_table(["condition", "method", "point", "KL (nats)", "Oracle reward", "gold reward"], body)


def _as_estimate(row: dict | None) -> Estimate | None:
    return None if row is None or row["value"] is None else Estimate(row["value"], row["low"], row["high"])


def _at_levels(estimates: dict[tuple, dict], condition: str, method: str, baseline: str, levels: Sequence[float]) -> str:
    """``ahead at KL 5, 10; level at KL 20``: the verdict at each level both curves reach."""
    grouped: dict[str, list[str]] = {}
    for level in levels:
        outcome = verdict(_as_estimate(estimates.get((condition, method, level))),
                          _as_estimate(estimates.get((condition, baseline, level))))
        if outcome is not None:
            grouped.setdefault(outcome, []).append(f"{level:g}")
    return "; ".join(f"{outcome} at KL {', '.join(at)}" for outcome, at in grouped.items()) or "no common KL level"


def verdict_table(traced: dict[str, Traced], summary: dict[tuple, dict], conditions: Sequence[str],
                  contests: dict[str, list[str]], levels: Sequence[float]) -> str:
    """Per condition with cells and each compared method (``contests``: method -> its baselines):
    ahead, level or behind each baseline, at each KL level where both are traced (the equal-KL
    estimates), else at the tuned points (the evaluation's gold reward, each side's KL beside it)."""
    estimates = {(r["condition"], r["method"], r["kl"]): r for r in equal_kl_rows(traced, levels)}
    baselines = list(dict.fromkeys(b for bs in contests.values() for b in bs))
    body = []
    for condition in conditions:
        pooled = lambda measure: {k[1]: s for k, s in summary.items()
                                  if k[0] == condition and k[2:] == (IN_DISTRIBUTION, measure, ALL)}
        tuned, kl, on_curves = pooled(GOLD), pooled(KL), set(methods_of(traced.get(condition, {})))
        if not tuned and not on_curves:
            continue
        for method, against in contests.items():
            row = [condition, method]
            for baseline in baselines:
                if baseline not in against:
                    row.append("")
                elif {method, baseline} <= on_curves:
                    row.append(_at_levels(estimates, condition, method, baseline, levels))
                elif {method, baseline} <= set(tuned):
                    outcome = verdict(_as_estimate(tuned[method]), _as_estimate(tuned[baseline]))
                    row.append(f"{outcome} at the tuned points (KL {kl[method]['value']:.1f} vs {kl[baseline]['value']:.1f})")
                else:
                    row.append("not run")
            body.append(row)
    return markdown_table(["condition", "method", *(f"vs {b}" for b in baselines)], body)


def _measured(traced: dict[str, Traced], measure: str) -> bool:
    """Whether every traced cell has ``measure`` (the Oracle's reward: :data:`ORACLE` among the evaluation's judges)."""
    return all(measure in c["scores"][IN_DISTRIBUTION] for cells in traced.values() for c in cells.values())


def frontier_rows(traced: dict[str, Traced], knobs: dict[str, str]) -> list[dict]:
    """Every traced cell's KL, gold reward and (where judged) the Oracle's on the evaluation prompts,
    for ``frontier.csv``."""
    measures = [KL, GOLD, *([ORACLE] if _measured(traced, ORACLE) else [])]
    return [{"condition": condition, "method": m, "knob": knobs.get(m, ""), "value": v, "seed": seed,
             **{measure: c["scores"][IN_DISTRIBUTION][measure]["mean"] for measure in measures}}
            for condition, cells in traced.items() for (m, v, seed), c in cells.items()]


def frontier_curves_plot(traced: dict[str, Traced], path: Path, measure: str = KL,
                         levels: Sequence[float] = ()) -> None:
    """Gold reward against ``measure`` (KL to the starting policy; the Oracle's reward shows
    over-optimisation), a curve per method through its traced points (means over seeds, in order of
    ``measure``), a panel per traced condition, the ``levels`` of ``measure`` dotted."""
    names = [n for n, cells in traced.items() if cells]
    if not names:
        return
    fig = new_figure(figsize=(5.5 * len(names), 4.2), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        means = {method: _mean_points(traced[name], method, measure) for method in methods_of(traced[name])}
        for method, points in means.items():
            ax.plot(*zip(*sorted((x, gold) for _, x, gold in points)), marker="o", markersize=3, label=method)
        for level in levels:
            ax.axvline(level, color="gray", linestyle=":", linewidth=0.8)
        # KL spans orders of magnitude along a knob (an estimate may dip below 0); a reward is on its own scale.
        if measure == KL and min(x for points in means.values() for _, x, _ in points) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(f"{measure_label(measure)} (mean over seeds)")
        ax.set_ylabel("gold reward (mean over seeds)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


@dataclass
class Frontiers:
    """A run's traced cells and how the report reads them.

    Attributes:
        traced: Per traced condition, its cells (method, knob value, seed) -> cell.
        knobs: The knob each method is traced along.
        levels: The KL levels (nats) the curves are read at.
        contests: Per compared method (each reading of DRDO), the baselines of the verdict; None: no verdict.
    """

    traced: dict[str, Traced]
    knobs: dict[str, str]
    levels: Sequence[float] = KL_LEVELS
    contests: dict[str, list[str]] | None = None

    def sections(self, summary: dict[tuple, dict], conditions: Sequence[str]) -> list[str]:
        """The report's opening: the verdict (with ``contests``), the gold reward and distinct-2 at equal
        KL, then (where the cells were judged by the Oracle) the gold reward against the Oracle's along the frontier."""
        lines = []
        if self.contests:
            lines += ["## Verdict at equal KL", "",
                      "Ahead or behind only where the 95% intervals over seeds separate, level where they overlap; at each "
                      "KL level both reach where both are traced (the table below), else at the tuned points (not at equal "
                      "KL: each side's KL in brackets).", "",
                      verdict_table(self.traced, summary, conditions, self.contests, self.levels), ""]
        if any(self.traced.values()):
            lines += ["## Gold reward at equal KL", "",
                      "Each method traced along its knob (the listed values and the tuned one); each seed's curve of "
                      "(KL, gold reward) on the evaluation prompts, pooled over temperatures, read at the level by "
                      "linear interpolation between the points that bracket it; mean over seeds with the 95% t-interval; "
                      "- where a seed's curve never reaches the level (never extrapolated).", "",
                      equal_kl_table(self.traced, self.knobs, self.levels), ""]
        if any(self.traced.values()) and _measured(self.traced, DISTINCT):
            lines += ["## Distinct-2 at equal KL", "",
                      "The gold reward (and the Oracle's) can be gamed by a policy that repeats what its judge likes; "
                      "the distinct-2 of its answers cannot. Read off the same curves as the gold reward above.", "",
                      equal_kl_table(self.traced, self.knobs, self.levels, DISTINCT), ""]
        if any(self.traced.values()) and _measured(self.traced, ORACLE):
            lines += ["## Gold against the Oracle's reward along the frontier", "",
                      "Each traced point's means over seeds on the evaluation prompts (`overoptimisation.png` plots "
                      "them): where the Oracle's reward rises along a method's knob and the gold reward falls, the "
                      "method over-optimises its proxy.", "",
                      overoptimisation_table(self.traced, self.knobs), ""]
        return lines

    def write(self, root: Path, summary: dict[tuple, dict], conditions: Sequence[str]) -> None:
        """``frontier.csv`` (every traced cell), ``equal_kl.csv`` (gold and distinct-2), ``equal_kl.md`` (:meth:`sections`),
        ``frontier_curves.png`` and, where the cells were judged by the Oracle, ``overoptimisation.png``
        (the gold reward against the Oracle's along the same curves)."""
        write_csv(frontier_rows(self.traced, self.knobs), root / "frontier.csv")
        measures = [GOLD, *([DISTINCT] if _measured(self.traced, DISTINCT) else [])]
        write_csv([r for m in measures for r in equal_kl_rows(self.traced, self.levels, m)], root / "equal_kl.csv")
        (root / "equal_kl.md").write_text("\n".join(self.sections(summary, conditions)))
        frontier_curves_plot(self.traced, root / "frontier_curves.png", KL, self.levels)
        if _measured(self.traced, ORACLE):
            frontier_curves_plot(self.traced, root / "overoptimisation.png", ORACLE)
        else:
            log.info("overoptimisation.png not drawn: the traced cells have no judge named %r", ORACLE)
