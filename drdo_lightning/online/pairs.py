"""Pairs from scored samples, and the training batch they make.

Pure functions, testable by hand: scores in, indices out (:func:`choose_pairs`); samples and
indices in, the batch :class:`data.collation.PairCollator` would build from data out
(:func:`pair_batch`), joined with the step's offline pairs (:func:`join_batches`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.tokenization import IGNORE_INDEX
from drdo_lightning.online.sampling import Samples

# A padded batch's tensors and what pads each (the keys of PairCollator's batches).
PADDING = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX}


class Pairs(NamedTuple):
    """The pairs of one step: indices into the samples (``i * k + j``), chosen the higher-scored."""

    chosen: list[int]
    rejected: list[int]
    ties: int  # prompts whose k scores all tie: no pair


def penalised(scores: Tensor, ended: Tensor, penalty: float | None) -> Tensor:
    """The Oracle's scores with ``penalty`` subtracted where a response has no EOS (TRL's
    ``missing_eos_penalty``): a response cut at ``max_new_tokens`` ranks below an ended one as good."""
    return scores if penalty is None else scores - penalty * (~ended).to(scores.dtype)


def choose_pairs(scores: Tensor, how: str, generator: torch.Generator | None = None) -> Pairs:
    """One pair per prompt from its k scores ``[P, k]``: ``best_worst``, the highest against the
    lowest (the first of equal ones); ``random``, a pair drawn uniformly (from ``generator``) among
    the responses of different scores. The chosen is the higher-scored; a prompt whose scores all
    tie gives no pair."""
    prompts, k = scores.shape
    chosen, rejected, ties = [], [], 0
    for i in range(prompts):
        row = scores[i]
        if bool((row == row[0]).all()):
            ties += 1
            continue
        if how == "best_worst":
            hi, lo = int(row.argmax()), int(row.argmin())
        elif how == "random":
            distinct = [(a, b) for a in range(k) for b in range(a + 1, k) if row[a] != row[b]]
            a, b = distinct[int(torch.randint(len(distinct), (), generator=generator))]
            hi, lo = (a, b) if row[a] > row[b] else (b, a)
        else:
            raise ValueError(f"pairs must be 'best_worst' or 'random', not {how!r}")
        chosen.append(i * k + hi)
        rejected.append(i * k + lo)
    return Pairs(chosen, rejected, ties)


def pair_batch(samples: Samples, pairs: Pairs, scores: Tensor, pad_token_id: int) -> dict[str, Tensor]:
    """The pairs as a training batch: ``{chosen,rejected}_{input_ids,attention_mask,labels}`` of
    prompt ids + response ids as the policy read and wrote them (labels ``-100`` on the prompt and on
    padding, :class:`PairCollator`), and ``chosen_score``/``rejected_score`` from ``scores`` ``[P * k]``."""
    examples = [
        {"prompt_ids": samples.prompt_ids[samples.prompt_of(w)], "chosen_ids": samples.response_ids[w],
         "rejected_ids": samples.response_ids[l], "chosen_score": float(scores[w]), "rejected_score": float(scores[l])}
        for w, l in zip(pairs.chosen, pairs.rejected)
    ]
    return PairCollator(pad_token_id)(examples)


def padded_to(tensor: Tensor, length: int, value: int) -> Tensor:
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)


def join_batches(online: dict[str, Tensor], offline: dict[str, Tensor], pad_token_id: int) -> dict[str, Tensor]:
    """The online pairs, then the offline ones, as one batch: sequences right-padded to one length,
    the keys both have (offline pairs without score columns give a batch without scores, which a
    distilling objective then refuses, naming the columns to set)."""
    length = max(online["chosen_input_ids"].shape[1], offline["chosen_input_ids"].shape[1])
    joined = {}
    for key in online.keys() & offline.keys():
        parts = [online[key], offline[key].to(online[key].device)]
        kind = next((k for k in PADDING if key.endswith(k)), None)
        if kind is not None:
            fill = pad_token_id if PADDING[kind] is None else PADDING[kind]
            parts = [padded_to(p, length, fill) for p in parts]
        joined[key] = torch.cat(parts)
    return joined
