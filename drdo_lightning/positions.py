"""Which positions of a padded batch matter, from its attention mask and labels alone: each row's last
token (where a reward head reads), the positions that predict a response token (where log-probs are
taken), and the position ids a model should see."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended position of each row; correct for left and right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def last_token_mask(attention_mask: Tensor) -> Tensor:
    """``[B, T]`` bool: each row's last attended position."""
    last = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
    last[torch.arange(last.shape[0], device=last.device), last_token_index(attention_mask)] = True
    return last


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count attended tokens only, so a left-padded row sees the same positions as
    its right-padded twin (models with absolute positions, e.g. GPT-2 and OPT, depend on this)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_prediction_mask(attention_mask: Tensor, labels: Tensor) -> Tensor:
    """``[B, T]``: the attended positions whose next token is an attended prompt token (not a
    response token, ``labels`` ``-100``); the first token of a row has no predicting position."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    mask[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool() & (labels[:, 1:] == -100)
    return mask


class KeptPositions(NamedTuple):
    """The positions of a batch that go through the LM head."""

    keep: Tensor  # [B, T] bool: projected onto the vocabulary
    predicts: Tensor  # [B, T] bool: predicts a response token
    predicts_prompt: Tensor  # [B, T] bool: predicts a prompt token (only when prompt log-probs are asked for)
    last: Tensor  # [B, T] bool: each row's last token, where the reward head reads
    targets: Tensor  # [K]: each kept position's next token (0 where it predicts nothing)
    rows: Tensor  # [K]: each kept position's row


def kept_positions(input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, prompt_logps: bool, last: bool) -> KeptPositions:
    """The positions to project (``labels`` unshifted, ``-100`` at prompt and padding positions): those
    that predict a response token, the prompt's too with ``prompt_logps``, each row's last with ``last``."""
    predicts = torch.zeros_like(attention_mask, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
    predicts_prompt = prompt_prediction_mask(attention_mask, labels) if prompt_logps else torch.zeros_like(predicts)
    last_token = last_token_mask(attention_mask)
    keep = predicts | predicts_prompt
    keep = keep | last_token if last else keep
    # Every kept row gets a target (0 where it predicts nothing) and is then weighted by
    # whether it predicts: selecting the predicting rows instead would copy the logits.
    targets = torch.where(labels != -100, labels, input_ids if prompt_logps else 0).roll(-1, dims=1)[keep]
    return KeptPositions(keep, predicts, predicts_prompt, last_token, targets, keep.nonzero()[:, 0])
