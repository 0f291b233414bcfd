"""What an objective asks of a forward, what the forward gives it per pair, and what it returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from drdo_lightning import heads, losses
from drdo_lightning.models import CausalLMWithRewardHead


class Needs(NamedTuple):
    """What an objective's loss reads, so the forward computes that and nothing more."""

    rejected: bool = True  # the rejected responses (SFT reads the chosen alone)
    reward_head: bool = False  # r̂ from a reward head on the policy
    token_unlikelihood: bool = False  # sum_t log(1 - p(y_l,t)) of the rejected responses
    prompt_logps: bool = False  # the chosen prompts' log-probs (an NLL over the whole chosen sequence)
    oracle_scores: int = 0  # dimensions of the Oracle score columns read: 0 none, 1 one score per response, 2 an ensemble's


class PairOutputs(NamedTuple):
    """Per-pair quantities ``[B]`` of one forward over a batch; ``None`` where the objective does not need them."""

    chosen_logps: Tensor  # z_w = log pi(y_w|x) over response tokens (sum, or mean with average_logps)
    rejected_logps: Tensor | None
    chosen_rewards: Tensor | None  # r̂(x, y_w) from the reward head
    rejected_rewards: Tensor | None
    # sum_t log(1 - p(y_l,t)) (mean with average_logps), only for objectives that ask for it
    rejected_token_unlikelihood: Tensor | None = None
    chosen_lengths: Tensor | None = None  # response tokens of y_w (at least 1), as averages divide by
    # sum of the prompt tokens' log-probs and their count, for an NLL over the whole chosen sequence
    chosen_prompt_logps: Tensor | None = None
    chosen_prompt_lengths: Tensor | None = None

    @classmethod
    def from_sequences(cls, values: heads.SequenceValues, pairs: int) -> PairOutputs:
        """Rows ``[:pairs]`` are the chosen responses, the rest (if any) the rejected ones."""
        rejected = values.logps.shape[0] > pairs

        def chosen(v: Tensor | None) -> Tensor | None:
            return v[:pairs] if v is not None else None

        def rejected_part(v: Tensor | None) -> Tensor | None:
            return v[pairs:] if v is not None and rejected else None

        return cls(
            chosen_logps=values.logps[:pairs],
            rejected_logps=rejected_part(values.logps),
            chosen_rewards=chosen(values.rewards),
            rejected_rewards=rejected_part(values.rewards),
            rejected_token_unlikelihood=rejected_part(values.token_unlikelihood),
            chosen_lengths=values.lengths[:pairs],
            chosen_prompt_logps=chosen(values.prompt_logps),
            chosen_prompt_lengths=chosen(values.prompt_lengths),
        )


class PairLoss(NamedTuple):
    """An objective's loss per pair ``[B]`` (the batch's loss is their mean) and what it logs beside it
    (per pair ``[B]`` or scalars; each logged as its batch mean)."""

    loss: Tensor
    logged: dict[str, Tensor]


def chosen_nll(out: PairOutputs, reduction: str, average_logps: bool) -> Tensor:
    """Each pair's NLL of its chosen response ``[B]`` (:func:`losses.chosen_nll_terms` times the batch
    size, so the batch's NLL is their mean), over the prompt too where the forward gave prompt log-probs."""
    total = out.chosen_logps * out.chosen_lengths if average_logps else out.chosen_logps
    count = out.chosen_lengths
    if out.chosen_prompt_logps is not None:
        total, count = total + out.chosen_prompt_logps, count + out.chosen_prompt_lengths
    return losses.chosen_nll_terms(total, count, reduction) * total.numel()


class HeadSettings(NamedTuple):
    """How a forward goes through the LM head (:mod:`drdo_lightning.heads`)."""

    average: bool = False  # mean token log-probs instead of sums
    chunk_rows: int | None = None  # the chunked head's positions per chunk; None for the one-piece head
    packed: bool = False  # the backbone on the sequences packed end to end
    fused_chunk_rows: int | None = None  # pairs per chunk of the head fused with the loss; None: never fused


def forward_pairs(
    model: CausalLMWithRewardHead,
    batch: dict[str, Tensor],
    needs: Needs,
    settings: HeadSettings,
    pair_loss: Callable[[PairOutputs], Tensor] | None = None,
) -> tuple[Tensor | None, PairOutputs]:
    """One forward of ``model`` over ``[chosen; rejected]`` (``[2B, T]``), split per pair.

    With ``pair_loss`` and ``settings.fused_chunk_rows``, the LM head is fused with the loss, the mean
    over pairs of ``pair_loss(outputs)`` ``[B]`` (:func:`heads.loss_and_sequence_values`), returned with
    the outputs (whose log-probs then carry no gradient; the loss does). Otherwise, or where the
    model's head does not fuse, the loss is None: the caller computes it from the outputs.
    """
    sides = ("chosen", "rejected") if needs.rejected else ("chosen",)
    inputs = [torch.cat([batch[f"{s}_{k}"] for s in sides]) for k in ("input_ids", "attention_mask", "labels")]
    wanted = heads.Wanted(average=settings.average, token_unlikelihood=needs.token_unlikelihood, prompt_logps=needs.prompt_logps)
    pairs = batch["chosen_input_ids"].shape[0]
    fused = None
    if pair_loss is not None and settings.fused_chunk_rows is not None:
        fused = heads.loss_and_sequence_values(
            model, *inputs, lambda v: pair_loss(PairOutputs.from_sequences(v, pairs)) / pairs, wanted,
            groups=pairs, chunk_rows=settings.fused_chunk_rows, packed=settings.packed,
        )
    if fused is None:
        values = heads.sequence_values(model, *inputs, wanted, chunk_rows=settings.chunk_rows, packed=settings.packed)
        return None, PairOutputs.from_sequences(values, pairs)
    loss, values = fused
    return loss, PairOutputs.from_sequences(values, pairs)
