"""Evaluation: sample from policies, score with judges, compare with intervals.

The protocol is the paper's (``docs/evaluation.md``), with the confidence intervals it lacks:

1. **Sample** (:mod:`.generation`, :mod:`.sampling`) one response per prompt from every policy with
   nucleus sampling (top-p 0.8) at each temperature (0.2, 0.5, 0.7, 0.9): seeded, batched with left padding.
2. **Score** (:mod:`.judges`) each (prompt, response) with every judge: a reward model (the Oracle,
   or any directory with ``reward_head.safetensors``) or a judge registered by name.
3. **Compare** (:mod:`.statistics`): policy A *wins* over B on a prompt and temperature when
   r(x, y_A) > r(x, y_B); ties are counted apart. Win rates, mean rewards and the reward advantage
   over a baseline policy (SFT) get 95% percentile-bootstrap intervals that resample prompts.
4. **Write** (:mod:`.plots`, :mod:`.report`) the generations (JSONL), every estimate (CSV and JSON),
   PNG plots and a markdown report that embeds them; :mod:`.command` is ``evaluate`` itself.
"""

from drdo_lightning.evaluation.command import evaluate
from drdo_lightning.evaluation.generation import Prompt, generate, load_policy
from drdo_lightning.evaluation.judges import Judge, RewardModelJudge, load_judge, register_judge
from drdo_lightning.evaluation.sampling import PAPER_TEMPERATURES, read_prompts, sample_and_score
from drdo_lightning.evaluation.statistics import Estimate, bootstrap_mean, distinct_n, paired_comparison, summarize

__all__ = [
    "PAPER_TEMPERATURES", "Estimate", "Judge", "Prompt", "RewardModelJudge", "bootstrap_mean", "distinct_n", "evaluate",
    "generate", "load_judge", "load_policy", "paired_comparison", "read_prompts", "register_judge", "sample_and_score",
    "summarize",
]
