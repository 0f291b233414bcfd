"""How far a trained policy moved from its starting point: KL(π || π_SFT) on the policy's own samples.

For a prompt x and a response y sampled from π, the log-ratio ``log π(y|x) − log π_SFT(y|x)``
(summed over the response's tokens) is an unbiased single-sample estimate of the sequence-level
``KL(π(·|x) || π_SFT(·|x))``; its mean over prompts estimates the expected KL over the prompt
distribution. A policy that collapses onto a few repetitive responses the starting policy finds
unlikely shows it as a large KL, next to a low distinct-2.

Both log-probabilities are taken at temperature 1, with no top-p cut: the policies' own
distributions, as in the KL penalty of RLHF and the β·KL that DPO's reward implies. The responses
themselves come from sampling at the evaluation's temperature and top-p (``q_T``), so at
temperature T < 1 or top-p < 1 the figure is ``E_{y~q_T}[log π(y|x) − log π_SFT(y|x)]``, the
log-ratio of the policies on the responses actually generated, and it equals KL(π || π_SFT)
exactly only at T = 1 and top-p = 1. A response cut at ``max_new_tokens`` (no EOS) is scored as
the prefix it is; a response that ended includes its EOS token, which was sampled too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from drdo_lightning import heads
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.evaluation.statistics import Estimate, bootstrap_mean
from drdo_lightning.models import CausalLMWithRewardHead


def _as_policy(model) -> CausalLMWithRewardHead:
    return model if isinstance(model, CausalLMWithRewardHead) else CausalLMWithRewardHead(model, None)


@torch.inference_mode()
def response_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """``log π(y|x)`` at temperature 1 of each response given its prompt, summed over the response's tokens ``[N]``.

    ``model`` is a :class:`CausalLMWithRewardHead` or a causal LM (wrapped in one, without a head);
    the log-probs come from :func:`heads.sequence_values` over ``prompt + response``
    as training batches them (:class:`data.collation.PairCollator`: right-padded with ``pad_token_id``,
    only the response's tokens as labels).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts and {len(response_ids)} responses")
    policy = _as_policy(model)
    device = next(policy.parameters()).device
    collate = PairCollator(pad_token_id)
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = collate([{"prompt_ids": list(p), "chosen_ids": list(r)}
                         for p, r in zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size])])
        logps = heads.sequence_values(policy, *(batch[f"chosen_{k}"].to(device) for k in ("input_ids", "attention_mask", "labels"))).logps
        out += logps.float().cpu().tolist()
    return np.asarray(out, dtype=float)


def log_ratios(
    policy,
    reference,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """``log π(y|x) − log π_ref(y|x)`` per response ``[N]``, both at temperature 1 (:func:`response_logps`):
    each a single-sample estimate of KL(π || π_ref) at its prompt when ``y`` was sampled from ``π``."""
    kwargs = dict(pad_token_id=pad_token_id, batch_size=batch_size)
    return (response_logps(policy, prompt_ids, response_ids, **kwargs)
            - response_logps(reference, prompt_ids, response_ids, **kwargs))


def kl_estimate(
    policy,
    reference,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 32,
    samples: int = 1000,
    seed: int = 0,
) -> Estimate:
    """KL(π || π_ref) estimated on ``π``'s own samples: the mean over prompts of :func:`log_ratios`
    (one response per prompt), with a percentile-bootstrap interval over prompts
    (:func:`statistics.bootstrap_mean`). See the module docstring for what the temperature does."""
    ratios = log_ratios(policy, reference, prompt_ids, response_ids, pad_token_id=pad_token_id, batch_size=batch_size)
    return bootstrap_mean(ratios, samples=samples, seed=seed)
