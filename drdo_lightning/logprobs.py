"""Log-probabilities of tokens and sequences from logits, with a lean backward."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# log(1 - pi) is -inf at pi = 1. A sequence log-prob of exactly 0 is reachable in float32
# (every token predicted with probability 1), so we cap z just below 0 to keep the
# unlikelihood term finite. The cap sits beyond the range the method needs: z <= -1e-8.
LOG_PROB_CEILING = -1e-8


# Rows of logits processed at once by token_logps: bounds its temporaries to about this many elements.
_TOKEN_LOGPS_CHUNK = 1 << 22


class _TokenLogps(torch.autograd.Function):
    """``logit[target] - logsumexp(logit)``, with a lean backward.

    Autograd's backward of ``gather`` and ``logsumexp`` would allocate three to four tensors of the
    size of ``logits`` (a scattered one-hot gradient, ``exp(logit - lse)``, their product and sum);
    this one writes the gradient ``g * (onehot - softmax)`` straight into one buffer, and both
    passes work through the rows in chunks, so temporaries stay small.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        rows = max(1, _TOKEN_LOGPS_CHUNK // max(1, logits[:1].numel()))
        lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(rows)])
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        chunks = zip(grad_logits.split(ctx.rows), logits.split(ctx.rows), lse.split(ctx.rows), grad.split(ctx.rows))
        for out, chunk, chunk_lse, chunk_grad in chunks:
            out.copy_((chunk.float() - chunk_lse.unsqueeze(-1)).exp_().mul_(-chunk_grad.unsqueeze(-1)))
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1).to(grad_logits.dtype))
        return grad_logits, None


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[target]`` at every position, in float32; ``targets`` has ``logits``' shape minus ``V``.

    ``log p = logit[target] - logsumexp(logit)``: only the logsumexp reduction touches the
    whole vocabulary, so no log-softmax copy of ``logits`` is materialised, and the backward
    allocates one gradient the size of ``logits`` (see :class:`_TokenLogps`).
    """
    return _TokenLogps.apply(logits, targets)


def _chunk_logps(project: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    return token_logps(project(hidden), targets)


def chunked_token_logps(
    hidden: Tensor, targets: Tensor, project: Callable[[Tensor], Tensor], *, chunk_rows: int
) -> Tensor:
    """``token_logps(project(hidden), targets)``, ``chunk_rows`` rows of ``hidden`` ``[N, H]`` at a time.

    ``project`` maps final hidden states to logits (the LM head and whatever the model applies
    after it). Each chunk's logits ``[chunk_rows, V]`` exist only while that chunk is computed:
    backward recomputes them (activation checkpointing per chunk), so the head's peak memory is one
    chunk's logits and their gradient, not ``[N, V]`` twice. The price is one more head matmul per
    step (the forward's, repeated in backward).
    """
    if not torch.is_grad_enabled():
        return torch.cat([_chunk_logps(project, h, t) for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows))])
    parts = [
        checkpoint(_chunk_logps, project, h, t, use_reentrant=False, preserve_rng_state=False)
        for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows))
    ]
    return torch.cat(parts)


def sequence_logps(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, average: bool = False
) -> Tensor:
    """Log-probability of each sequence's response tokens, ``z = log pi(y|x)``.

    ``logits`` is ``[B, T, V]``; ``labels`` is ``[B, T]``: the input ids with prompt and
    padding positions set to ``ignore_index``, *unshifted* (position t's logits predict
    token t+1, the shift happens here). Returns the sum of response-token log-probs ``[B]``
    or, with ``average=True``, their mean (the length-normalised variant). See
    :func:`token_logps`; ``CausalLMWithRewardHead.sequence_logps`` computes the same from
    hidden states without projecting prompt and padding positions onto the vocabulary.
    """
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != ignore_index
    total = (token_logps(logits, labels.masked_fill(~mask, 0)) * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range.

    Uses ``log(-expm1(x))`` for ``x > -ln 2`` and ``log1p(-exp(x))`` otherwise (Mächler 2012).
    ``torch.where`` evaluates both branches, so each branch's input is clamped to the region
    where it is finite; otherwise the unused branch would inject NaN gradients.
    """
    x = x.clamp(max=LOG_PROB_CEILING)
    near_zero = x > -math.log(2.0)
    from_expm1 = torch.log(-torch.expm1(torch.where(near_zero, x, -math.log(2.0))))
    from_log1p = torch.log1p(-torch.exp(torch.where(near_zero, -math.log(2.0), x)))
    return torch.where(near_zero, from_expm1, from_log1p)
