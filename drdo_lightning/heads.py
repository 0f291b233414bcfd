"""Per-sequence values through the LM head: the one-piece, the chunked and the fused head.

Every objective reads the same few numbers per sequence: ``z = log pi(y|x)`` over the response
tokens, the reward head's ``r̂``, and, where asked, the token-level unlikelihood of the response and
the prompt's log-probs. This module computes them from a :class:`CausalLMWithRewardHead` in one
backbone pass, projecting onto the vocabulary only the positions that predict a response token (and
the prompt's, where asked): prompt and padding positions never get logits.

Three ways through the LM head, the same values:

- one piece (:func:`sequence_values` without ``chunk_rows``): the kept positions' logits at once;
- chunked (``chunk_rows``): ``chunk_rows`` positions at a time, each chunk's logits recomputed in
  backward (:func:`logprobs.chunked_token_logps`), so the head's memory is one chunk's logits;
- fused with the loss (:func:`loss_and_sequence_values`): a chunk of whole pairs at a time, each
  chunk's gradients computed in the forward pass (:func:`logprobs.fused_head_loss`), three head
  matrix products instead of the chunked head's four.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor
from transformers import PreTrainedModel

from drdo_lightning import logprobs
from drdo_lightning.models import CausalLMWithRewardHead, vocabulary_size
from drdo_lightning.positions import KeptPositions, kept_positions

# Logits elements per chunk of the chunked head (256 MiB in fp32, 523 positions at 128k tokens).
# Each chunk's backward adds its share into the head's whole weight gradient, so many small chunks
# cost time (measured at 128k: 130 positions per chunk 1.7x the one-piece step's time, 512 about
# 1.35x) while the step's peak memory did not depend on the chunk size in that range.
HEAD_CHUNK_ELEMENTS = 1 << 26


class HeadDefault(NamedTuple):
    """The LM head a device type gets with ``chunked_head: null``."""

    fuse_training: bool  # a training step that may fuse the head with its loss does (logprobs.fused_head_loss)
    chunked_from_vocabulary: int  # where a step does not fuse: the recomputing chunked head from this vocabulary on


# The default LM head per device type: the one place it is chosen. "cpu" as measured on CPU
# (docs/performance.md, "Large vocabularies"): fused wherever a training step fuses (never slower there,
# at 32k and 128k tokens), elsewhere chunked from 100k tokens, where one-piece logits outgrow the rest of
# the step. "cuda": the CPU's choice until the GPU run measures the heads on CUDA; its table
# (docs/performance.md, "GPU run") decides this entry. Other device types take the CPU's.
HEAD_DEFAULTS = {
    "cpu": HeadDefault(fuse_training=True, chunked_from_vocabulary=100_000),
    "cuda": HeadDefault(fuse_training=True, chunked_from_vocabulary=100_000),
}


def head_default(device_type: str) -> HeadDefault:
    """The default LM head on ``device_type`` (``torch.device.type``): :data:`HEAD_DEFAULTS`'s entry."""
    return HEAD_DEFAULTS.get(device_type, HEAD_DEFAULTS["cpu"])


class Wanted(NamedTuple):
    """What to compute per sequence beside ``z`` and ``r̂``."""

    average: bool = False  # z as the mean token log-prob instead of the sum (length-normalised)
    token_unlikelihood: bool = False  # sum_t log(1 - p(y_t)) over the response (mean with average)
    prompt_logps: bool = False  # the sum of the prompt tokens' log-probs, for an NLL over the whole sequence


class SequenceValues(NamedTuple):
    """Per-sequence values ``[N]`` of one forward; ``None`` where not asked for."""

    logps: Tensor  # z = log pi(y|x) over the response tokens (sum, or mean with Wanted.average)
    rewards: Tensor | None  # r̂(x, y) from the reward head (None without one)
    token_unlikelihood: Tensor | None  # sum_t log(1 - p(y_t)) (mean with Wanted.average)
    prompt_logps: Tensor | None  # sum of the prompt tokens' log-probs (every attended token but the first)
    lengths: Tensor  # response tokens (at least 1), what averages divide by
    prompt_lengths: Tensor | None  # the prompt tokens summed in prompt_logps


def head_chunk_rows(lm: PreTrainedModel, chunked: bool | None) -> int | None:
    """Positions per chunk of the chunked LM head (``HEAD_CHUNK_ELEMENTS`` logits), or None for the one-piece head.

    ``chunked=None`` decides by the vocabulary: chunked from the model's device's
    ``head_default(...).chunked_from_vocabulary`` tokens on.
    """
    vocabulary = vocabulary_size(lm)
    if chunked is None:
        chunked = vocabulary >= head_default(next(lm.parameters()).device.type).chunked_from_vocabulary
    return max(1, HEAD_CHUNK_ELEMENTS // vocabulary) if chunked else None


def per_sequence(token: Tensor, rewards: Tensor | None, kept: KeptPositions, wanted: Wanted) -> SequenceValues:
    """:class:`SequenceValues` from the kept positions' token log-probs ``[K]``."""
    lengths = kept.predicts.sum(-1).clamp(min=1)
    sequences = kept.keep.shape[0]

    def per_row(values: Tensor, weight: Tensor, mean: bool) -> Tensor:
        total = values.new_zeros(sequences).index_add(0, kept.rows, values * weight)
        return total / lengths if mean else total

    response = kept.predicts[kept.keep]
    return SequenceValues(
        logps=per_row(token, response, wanted.average),
        rewards=rewards,
        token_unlikelihood=per_row(logprobs.log1mexp(token), response, wanted.average) if wanted.token_unlikelihood else None,
        prompt_logps=per_row(token, kept.predicts_prompt[kept.keep], False) if wanted.prompt_logps else None,
        lengths=lengths,
        prompt_lengths=kept.predicts_prompt.sum(-1) if wanted.prompt_logps else None,
    )


def sequence_values(
    model: CausalLMWithRewardHead,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    wanted: Wanted = Wanted(),
    *,
    chunk_rows: int | None = None,
    packed: bool = False,
) -> SequenceValues:
    """Response log-probs ``z`` and rewards ``r̂`` (and what ``wanted`` asks for) per sequence, one backbone pass.

    The same values as ``logprobs.sequence_logps(model(input_ids, attention_mask).logits, labels)``
    (``labels`` unshifted, ``-100`` at prompt and padding positions), but only the positions that
    predict a response token (and each row's last token, for the reward) go through the LM head:
    that saves their share of the largest matrix product and of the largest activation
    (``[B, T, V]``); e.g. a quarter of both with 64-token prompts before 192-token responses. With
    ``wanted.prompt_logps`` the prompt positions are projected too (TRL's ORPO convention of an NLL
    over the whole sequence).

    With ``chunk_rows`` the kept positions go through the LM head ``chunk_rows`` at a time, their
    logits recomputed in backward (:func:`logprobs.chunked_token_logps`): the head's memory is one
    chunk's ``[chunk_rows, V]``, not the batch's ``[N, V]`` kept for backward and its gradient.
    With ``packed`` the backbone runs on the sequences packed end to end (:mod:`drdo_lightning.packing`):
    no compute on padding. Both fall back to the one-piece padded forward for a model whose logits
    :meth:`CausalLMWithRewardHead.project` does not reproduce, and packing for a model that cannot
    keep packed sequences apart (one notice each).
    """
    kept = kept_positions(input_ids, attention_mask, labels, prompt_logps=wanted.prompt_logps, last=model.reward_head is not None)
    return values_at(model, input_ids, attention_mask, kept, wanted, chunk_rows=chunk_rows, packed=packed)


def values_at(
    model: CausalLMWithRewardHead,
    input_ids: Tensor,
    attention_mask: Tensor,
    kept: KeptPositions,
    wanted: Wanted,
    *,
    chunk_rows: int | None,
    packed: bool,
) -> SequenceValues:
    """:func:`sequence_values` at positions already kept (:func:`positions.kept_positions`)."""
    reproduced = (chunk_rows is not None or packed) and model.head_is_reproduced(input_ids)
    packing = model.packing_for(attention_mask) if reproduced and packed else None
    one_piece = not reproduced or (chunk_rows is None and packing is None)
    backbone = model.head_inputs(input_ids, attention_mask, kept, logits=one_piece, packing=packing)
    if one_piece:
        token = logprobs.token_logps(backbone.logits, kept.targets)
    elif chunk_rows is None:
        token = logprobs.token_logps(model.project(backbone.hidden), kept.targets)
    else:
        token = logprobs.chunked_token_logps(backbone.hidden, kept.targets, model.project, chunk_rows=chunk_rows)
    return per_sequence(token, backbone.rewards, kept, wanted)


def loss_and_sequence_values(
    model: CausalLMWithRewardHead,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    loss_of: Callable[[SequenceValues], Tensor],
    wanted: Wanted = Wanted(),
    *,
    groups: int,
    chunk_rows: int,
    packed: bool = False,
) -> tuple[Tensor, SequenceValues] | None:
    """``(loss, values)``: ``values`` as :func:`sequence_values` gives them, and ``loss_of(values).sum()``,
    a sum of one term per group (a preference pair: rows ``i``, ``i + groups``, ... of the batch), with
    the LM head fused to the loss (:func:`logprobs.fused_head_loss`): a chunk of whole groups at a time,
    each chunk's gradient computed in the forward pass, and one chunk's logits in memory. Each term of
    ``loss_of`` must depend on its own group's values only; the log-probs in ``values`` carry no gradient
    (the loss does; the rewards keep theirs). A batch with a group of more than twice ``chunk_rows``
    positions takes the recomputing chunked head, the loss computed from its values. None, computing
    nothing, for a model whose head does not fuse (:meth:`CausalLMWithRewardHead.fuses_head`).
    """
    if not model.fuses_head(input_ids):
        return None
    kept = kept_positions(input_ids, attention_mask, labels, prompt_logps=wanted.prompt_logps, last=model.reward_head is not None)
    chunks = logprobs.chunks_of_groups(kept.rows % groups, groups, chunk_rows)
    if chunks is None:
        values = values_at(model, input_ids, attention_mask, kept, wanted, chunk_rows=chunk_rows, packed=packed)
        return loss_of(values).sum(), values
    packing = model.packing_for(attention_mask) if packed else None
    backbone = model.head_inputs(input_ids, attention_mask, kept, logits=False, packing=packing)
    head = model.lm.get_output_embeddings()
    loss, token = logprobs.fused_head_loss(
        backbone.hidden, kept.targets, head.weight, head.bias, backbone.rewards, chunks,
        lambda token, rewards: loss_of(per_sequence(token, rewards, kept, wanted)),
    )
    return loss, per_sequence(token, backbone.rewards, kept, wanted)
