"""The online mode's settings: :class:`OnlineOptions`, the ``online`` argument of every objective,
checked when the objective is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from drdo_lightning.errors import SettingError

PAIRINGS = ("best_worst", "random")


@dataclass(frozen=True)
class OnlineOptions:
    """How each training step makes its pairs from the current policy (``--model.online.*``).

    Per prompt ``k`` responses are sampled from the policy (nucleus sampling, as the evaluation
    samples), each scored by the Oracle ``judge`` in memory, and paired: the higher-scored one
    chosen, the Oracle's scores as the pair's ``r*(x, y_w)`` and ``r*(x, y_l)``. The objective
    then trains on those pairs with its own loss.

    Args:
        judge: The Oracle: a reward-model directory (an Oracle trained here, or a one-label
            sequence classifier with its own tokenizer) or a judge registered by name
            (:func:`evaluation.judges.load_judge`). Never trained, never saved.
        k: Responses sampled per prompt, at least 2.
        temperature: Sampling temperature, above 0 (greedy decoding would give k equal responses).
        top_p: Nucleus of the sampling distribution, in (0, 1].
        max_new_tokens: The longest response; one cut there has no EOS.
        pairs: ``best_worst``: per prompt the highest- against the lowest-scored response;
            ``random``: a random pair of responses whose scores differ. A prompt whose k scores
            all tie gives no pair (counted: ``train/online/ties_dropped``).
        missing_eos_penalty: Subtracted from the Oracle's score of a response that reached
            ``max_new_tokens`` without EOS (TRL's option of that name); the penalised score is
            what pairs are ranked by and what a distilling objective distils. None: no penalty.
        log_samples_every_n_steps: Every that many training steps, a few samples (prompt,
            response, score) are appended to ``samples.jsonl`` in the logger's folder and handed to
            loggers that log text (wandb). 0: never.
        kl_every_n_steps: Every that many training steps (and on every validation batch), estimate
            the KL to the starting policy on the step's samples (``train/online/kl``): two forwards
            over the samples, about a quarter of a step at k = 4. Objectives with a reference use
            it; the others keep a frozen copy of the starting policy for it (with LoRA the adapters
            are switched off instead, no copy). 0: never, and no copy kept.
        seed: The seed each step's sampling seed is derived from, with the step and the rank
            (:func:`online.sampling.step_seed`); None: the run's ``seed_everything``.
    """

    judge: str
    k: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    pairs: Literal["best_worst", "random"] = "best_worst"
    missing_eos_penalty: float | None = None
    log_samples_every_n_steps: int = 50
    kl_every_n_steps: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.k >= 2, f"online.k must be at least 2 (a pair needs two responses), got {self.k}"),
            (self.temperature > 0, f"online.temperature must be above 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"online.top_p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"online.max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.pairs in PAIRINGS, f"online.pairs must be one of {PAIRINGS}, got {self.pairs!r}"),
            (self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
             f"online.missing_eos_penalty must be at least 0, got {self.missing_eos_penalty}"),
            (self.kl_every_n_steps >= 0, f"online.kl_every_n_steps must be at least 0, got {self.kl_every_n_steps}"),
            (self.log_samples_every_n_steps >= 0,
             f"online.log_samples_every_n_steps must be at least 0, got {self.log_samples_every_n_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingError(message)
