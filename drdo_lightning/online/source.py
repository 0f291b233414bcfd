"""The online source of pairs: prompts in, sampled, scored by the Oracle and paired; and what a
user watches of it (``train/online/...``).

:class:`OnlineSource` holds what a run needs between steps: the sampler, the judge (in memory,
never trained nor saved) and the seed every step's draws derive from, which is all of its random
state (a checkpoint keeps it: :meth:`OnlineSource.state_dict`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from drdo_lightning.evaluation.divergence import response_logps
from drdo_lightning.evaluation.judges import Judge
from drdo_lightning.online.options import OnlineOptions
from drdo_lightning.online.pairs import Pairs, choose_pairs, join_batches, pair_batch, penalised
from drdo_lightning.online.sampling import Sampler, Samples, evaluating, step_seed

SAMPLES_FILE = "samples.jsonl"
LOGGED_SAMPLES = 4  # samples written out each time samples are logged
# p_w = sigmoid(z_w - z_l) strictly inside this range: the pair still teaches the preference term something.
INFORMATIVE_P = (0.05, 0.95)
PAIR_METRICS = ("margin_mean", "margin_std", "informative_pairs")  # means over a step's pairs, absent without pairs


class OnlineStep(NamedTuple):
    """One step's sampling: the responses, the Oracle's scores ``[P * k]`` (as scored, and as
    ranked after the EOS penalty), the pairs, and the batch to train on: the online pairs first,
    then the step's offline pairs if any (None when there is no pair at all)."""

    samples: Samples
    scores: Tensor
    ranked: Tensor
    pairs: Pairs
    batch: dict[str, Tensor] | None


class OnlineSource:
    """Pairs from the current policy for each step (:class:`online.options.OnlineOptions`)."""

    def __init__(self, options: OnlineOptions, sampler: Sampler, judge: Judge, pad_token_id: int, seed: int) -> None:
        self.options, self.sampler, self.judge = options, sampler, judge
        self.pad_token_id, self.seed = pad_token_id, seed

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = state["seed"]

    def step(self, model: torch.nn.Module, batch: dict[str, Any], *draw: int | str) -> OnlineStep:
        """Sample ``k`` responses to each of ``batch["prompts"]`` from ``model`` (a causal LM), score
        and pair them, and join the batch's offline pairs (its other keys, as the data module
        collates them); every draw comes from :func:`sampling.step_seed` of the seed and ``draw``
        (stage, step, rank)."""
        options, prompts = self.options, batch["prompts"]
        samples = self.sampler(model, prompts, options, step_seed(self.seed, *draw, "sample"))
        repeated = [samples.prompts[samples.prompt_of(i)] for i in range(len(samples.texts))]
        scores = torch.tensor(self.judge(repeated, samples.texts), dtype=torch.float32)
        ranked = penalised(scores, torch.tensor(samples.ended), options.missing_eos_penalty)
        generator = torch.Generator().manual_seed(step_seed(self.seed, *draw, "pairs"))
        pairs = choose_pairs(ranked.view(len(prompts), options.k), options.pairs, generator)
        online = pair_batch(samples, pairs, ranked, self.pad_token_id) if pairs.chosen else None
        offline = {k: v for k, v in batch.items() if k != "prompts"} or None
        if online is not None and offline is not None:
            online = join_batches(online, offline, self.pad_token_id)
        return OnlineStep(samples, scores, ranked, pairs, online if online is not None else offline)


def step_metrics(step: OnlineStep, chosen_logps: Tensor | None, rejected_logps: Tensor | None) -> dict[str, Tensor]:
    """What a user watches of a step: the Oracle's mean reward of the samples (before any EOS penalty),
    their mean length in tokens, the share that ended in EOS, the prompts whose scores all tied, and
    over the pairs the Oracle margin ``Δr* = r*_w - r*_l`` (mean, std) and the share whose
    ``p_w = sigmoid(z_w - z_l)`` (the policy's log-probs of this step's pairs) lies in (0.05, 0.95)."""
    samples = step.samples
    metrics = {
        "reward": step.scores.mean(),
        "length": torch.tensor([len(ids) for ids in samples.response_ids], dtype=torch.float32).mean(),
        "eos_rate": torch.tensor(samples.ended, dtype=torch.float32).mean(),
        "ties_dropped": torch.tensor(float(step.pairs.ties)),
        "pairs": torch.tensor(float(len(step.pairs.chosen))),
    }
    if step.pairs.chosen:
        margins = step.ranked[step.pairs.chosen] - step.ranked[step.pairs.rejected]
        metrics["margin_mean"], metrics["margin_std"] = margins.mean(), margins.std(unbiased=False)
    if chosen_logps is not None and rejected_logps is not None:
        p_chosen = torch.sigmoid((chosen_logps - rejected_logps).detach().float())
        low, high = INFORMATIVE_P
        metrics["informative_pairs"] = ((p_chosen > low) & (p_chosen < high)).float().mean()
    return metrics


def sample_logps(model: torch.nn.Module, samples: Samples, pad_token_id: int) -> Tensor:
    """``log pi(y|x)`` of every sample ``[P * k]``, summed over its tokens at temperature 1, in eval mode
    (:func:`evaluation.divergence.response_logps`). The KL estimate to the starting policy is the mean
    over samples of this policy's minus the start's: per prompt a single-sample estimate of
    KL(pi || pi_0), exact in expectation for samples drawn at temperature 1 and top-p 1."""
    prompt_ids = [samples.prompt_ids[samples.prompt_of(i)] for i in range(len(samples.response_ids))]
    with evaluating(model):
        logps = response_logps(model, prompt_ids, samples.response_ids, pad_token_id=pad_token_id,
                               batch_size=max(len(prompt_ids), 1))
    return torch.from_numpy(logps).float()


def sample_records(step: OnlineStep, global_step: int, count: int = LOGGED_SAMPLES) -> list[dict[str, Any]]:
    """The first ``count`` samples as rows ``{step, prompt, response, score, ended}`` (score: the Oracle's, unpenalised)."""
    samples = step.samples
    return [{"step": global_step, "prompt": samples.prompts[samples.prompt_of(i)], "response": samples.texts[i],
             "score": float(step.scores[i]), "ended": samples.ended[i]} for i in range(min(count, len(samples.texts)))]


def append_records(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the JSON Lines file ``path`` (made with its folders if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
