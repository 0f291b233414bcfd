"""The evaluation report: a markdown page of tables that embeds the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from drdo_lightning.evaluation.statistics import ALL, lookup
from drdo_lightning.reports import markdown_table


def _fmt(row: dict | None, percent: bool) -> str:
    if row is None:
        return "-"
    if percent:
        return f"{row['value']:.0%} [{row['low']:.0%}, {row['high']:.0%}]"
    return f"{row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def _matrix(rows: list[dict], judge: str, policies: Sequence[str], statistic: str, cell: Callable[[dict], str]) -> str:
    """Markdown table of a pairwise statistic (all temperatures): row policy against column opponent."""
    body = [[a] + ["" if a == b else cell(lookup(rows, judge=judge, policy=a, opponent=b, temperature=ALL, statistic=statistic))
                   for b in policies] for a in policies]
    return markdown_table(["policy", *policies], body)


def _by_temperature(rows: list[dict], judge: str, policies: Sequence[str], statistic: str, columns: list[str],
                    percent: bool = False, **where) -> str:
    """Markdown table of a per-policy statistic, one column per temperature."""
    body = [[p] + [_fmt(lookup(rows, judge=judge, policy=p, temperature=t, statistic=statistic, **where), percent)
                   for t in columns]
            for p in policies]
    return markdown_table(["policy", *columns], body)


def write_report(rows: list[dict], settings: dict, plots: dict[str, Path], out: Path) -> Path:
    """``report.md``: the settings, then per judge the win-rate matrix, ties, mean rewards and the
    advantage over the baseline, with every plot embedded."""
    policies, judges, baseline = settings["policies"], settings["judges"], settings["baseline"]
    columns = [str(t) for t in settings["temperatures"]] + [ALL]
    lines = ["# Evaluation report", "", markdown_table(["setting", "value"], [[k, f"`{json.dumps(v)}`"] for k, v in settings.items()])]
    lines += ["", "Win rate = P(r_A > r_B) + P(r_A = r_B) / 2 on the same prompt and temperature; "
              "brackets: 95% bootstrap interval over prompts. Ties are listed apart."]
    for judge in judges:
        lines += [
            "", f"## Judge: {judge}", "", f"![win rates, {judge}]({plots[f'win_{judge}'].name})", "",
            "Win rate of the row policy over the column policy (all temperatures):", "",
            _matrix(rows, judge, policies, "win_rate", lambda r: _fmt(r, True)), "",
            "Ties (all temperatures):", "",
            _matrix(rows, judge, policies, "tie", lambda r: f"{r['value']:.0%}"), "",
            "Mean reward by temperature:", "",
            _by_temperature(rows, judge, policies, "mean_reward", columns),
        ]
        if baseline in policies:
            others = [p for p in policies if p != baseline]
            lines += ["", f"Head to head against `{baseline}`: win rate of each policy over `{baseline}` "
                      "(ties half), by temperature:", "",
                      _by_temperature(rows, judge, others, "win_rate", columns, percent=True, opponent=baseline),
                      "", f"Reward advantage over `{baseline}` (same prompts):", "",
                      _by_temperature(rows, judge, others, "advantage", columns)]
    lines += ["", "## Diversity", "", "Distinct-2 of the generations (distinct word bigrams / all word bigrams; "
              "1 = no bigram repeats), by temperature:", "",
              markdown_table(["policy", *columns], [[p] + [f"{lookup(rows, policy=p, temperature=t, statistic='distinct_2')['value']:.3f}"
                                                   for t in columns] for p in policies])]
    reference = settings.get("kl_reference")
    if reference is not None:
        lines += ["", f"KL(policy || `{reference}`) on the policy's own samples, by temperature: the mean over "
                  "prompts of log π(y|x) − log π_ref(y|x), both at temperature 1, of the response sampled at "
                  "that temperature (exactly the KL only at temperature 1 and top-p 1); nats:", "",
                  _by_temperature(rows, "", policies, "kl", columns, opponent=reference)]
    lines += ["", "## Mean reward vs temperature", "", f"![reward vs temperature]({plots['temperature'].name})"]
    if "training" in plots:
        lines += ["", "## Training curves", "", f"![training curves]({plots['training'].name})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
