"""Judges: a reward model, or any reward function registered by name (:func:`register_judge`).

A judge maps (prompts, responses) to one reward per pair. Reward models are directories the
``score`` command could score with; the embedded default registers its gold reward as ``vader``.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

from drdo_lightning.data.pairs import Columns, TextPair
from drdo_lightning.evaluation.generation import Prompt
from drdo_lightning.scoring import Scorer, require_reward_model

# Judge: (prompts, responses) -> one reward per pair.
Judge = Callable[[Sequence[Prompt], Sequence[str]], list[float]]

class RewardModelJudge:
    """Rewards from a reward model (an Oracle trained here or a one-label sequence classifier),
    tokenized exactly as ``score`` tokenizes for it.

    Each distinct (prompt, response) is scored once, so identical responses get identical
    rewards (a tie), whatever batch they land in. ``progress``: a progress bar for each call (off
    where a call is one small part of a step, as the online mode's Oracle is).
    """

    def __init__(self, path: str, *, batch_size: int = 32, max_prompt_length: int = 512, max_length: int = 1024,
                 device: str = "cpu", trust_remote_code: bool = False, progress: bool = True) -> None:
        require_reward_model(path, "judge")
        self.scorer = Scorer(path, batch_size=batch_size, max_prompt_length=max_prompt_length, max_length=max_length,
                             device=device, trust_remote_code=trust_remote_code)
        self.name, self.progress = path, progress

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        keys = [(json.dumps(p), r) for p, r in zip(prompts, responses)]  # conversations are lists: not hashable
        unique = dict(zip(keys, zip(prompts, responses)))
        pairs = [TextPair(p, r, None, None, None, prompt_has_special_tokens=False) for p, r in unique.values()]
        rewards = self.scorer.rewards(pairs, Columns("prompt", "response", None), sides=("chosen",),
                                      desc=f"judge {self.name}", progress=self.progress)["chosen"]
        by_key = dict(zip(unique, rewards))
        return [by_key[k] for k in keys]


# name -> a judge that needs no files (a reward function); anything else names a reward model.
REGISTERED: dict[str, Judge] = {}


def register_judge(name: str, judge: Judge) -> None:
    """Make ``name`` a judge spec of :func:`load_judge` (and of ``evaluate --judges``)."""
    REGISTERED[name] = judge


def require_judge(name: str, spec: str) -> None:
    """Raise a :class:`~drdo_lightning.errors.UserError` unless ``spec`` is a registered judge or a trained reward model."""
    if spec not in REGISTERED:
        require_reward_model(spec, f"judge {name!r}:")


def load_judge(spec: str, **kwargs) -> Judge:
    """A registered judge by name, or a reward-model directory (``kwargs`` go to :class:`RewardModelJudge`)."""
    return REGISTERED[spec] if spec in REGISTERED else RewardModelJudge(spec, **kwargs)
