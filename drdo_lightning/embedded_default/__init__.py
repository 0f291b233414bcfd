"""The embedded default: a sentiment-steering task that needs no downloads, and its build.

:mod:`.task` generates the data and models, :mod:`.build` trains the shipped ``embedded_default/``
folder. Importing this package registers the task's gold reward as the judge ``vader``.
"""

from __future__ import annotations

from pathlib import Path

from drdo_lightning.embedded_default.task import gold_reward
from drdo_lightning.errors import register_shipped_folder
from drdo_lightning.evaluation.judges import register_judge

EMBEDDED = Path("embedded_default")  # the shipped folder, relative to the repository root
GOLD = "vader"  # judge spec of the task's gold reward
MADE_BY = "build the embedded default with `python -m drdo_lightning build-embedded-default`"
# The two evaluation prompt families: held-out prompts of the training distribution, and
# out-of-distribution prompts whose openings and subjects no training prompt uses (task.generate_ood_prompts).
EVAL_PROMPTS = str(EMBEDDED / "data" / "eval.jsonl")
OOD_PROMPTS = str(EMBEDDED / "data" / "eval_ood.jsonl")
# `evaluate` on the command line: the held-out prompts, judged by the Oracle and the gold reward
# (`--prompts embedded_default/data/eval_ood.jsonl` judges on the OOD family instead).
EVALUATE_DEFAULTS = {"judges": {"oracle": str(EMBEDDED / "oracle"), "gold": GOLD}, "prompts": EVAL_PROMPTS}


def gold_judge(prompts, responses) -> list[float]:
    """The gold reward: VADER compound sentiment of the response alone (the prompt is not read)."""
    return gold_reward(responses)


register_judge(GOLD, gold_judge)
register_shipped_folder(str(EMBEDDED), MADE_BY)
