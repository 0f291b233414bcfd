"""Evaluation: sample from policies, score with judges, compare with intervals.

The protocol is the paper's (``docs/evaluation.md``), with the confidence intervals it lacks:

1. **Sample** (:mod:`.generation`, :mod:`.sampling`) one response per prompt from every policy with
   nucleus sampling (top-p 0.8) at each temperature (0.2, 0.5, 0.7, 0.9): seeded, batched with left padding.
2. **Score** (:mod:`.judges`) each (prompt, response) with every judge: a reward model (the Oracle,
   or any directory with ``reward_head.safetensors``) or a judge registered by name.
3. **Compare** (:mod:`.statistics`): policy A *wins* over B on a prompt and temperature when
   r(x, y_A) > r(x, y_B); ties are counted apart. Win rates, mean rewards and the reward advantage
   over a baseline policy (SFT) get 95% percentile-bootstrap intervals that resample prompts;
   :mod:`.divergence` estimates each policy's KL to the starting policy on its own samples, and
   :func:`.statistics.margin_bin_accuracy` rankers' accuracy by bin of gold margin.
4. **Write** (:mod:`.plots`, :mod:`.report`) the generations (JSONL), every estimate (CSV and JSON),
   PNG plots and a markdown report that embeds them. The ``evaluate`` command that runs these steps is
   :mod:`drdo_lightning.evaluating`, above the objectives (it exports checkpoints it is given).
"""

from drdo_lightning.evaluation.divergence import kl_estimate, log_ratios, response_logps
from drdo_lightning.evaluation.generation import Prompt, generate, generate_ids, load_policy
from drdo_lightning.evaluation.judges import Judge, RewardModelJudge, load_judge, register_judge
from drdo_lightning.evaluation.sampling import PAPER_TEMPERATURES, read_prompts, sample_and_score
from drdo_lightning.evaluation.statistics import (
    Estimate,
    bootstrap_mean,
    distinct_n,
    margin_bin_accuracy,
    paired_comparison,
    summarize,
    wilson_interval,
)

__all__ = [
    "PAPER_TEMPERATURES", "Estimate", "Judge", "Prompt", "RewardModelJudge", "bootstrap_mean", "distinct_n",
    "generate", "generate_ids", "kl_estimate", "load_judge", "load_policy", "log_ratios", "margin_bin_accuracy",
    "paired_comparison", "read_prompts", "register_judge", "response_logps", "sample_and_score", "summarize",
    "wilson_interval",
]
