"""Log-probabilities of tokens and sequences from logits, with a lean backward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# log(1 - pi) is -inf at pi = 1. A sequence log-prob of exactly 0 is reachable in float32
# (every token predicted with probability 1), so we cap z just below 0 to keep the
# unlikelihood term finite. The cap sits beyond the range the method needs: z <= -1e-8.
LOG_PROB_CEILING = -1e-8


# Rows of logits processed at once by token_logps: bounds its temporaries to about this many elements.
_TOKEN_LOGPS_CHUNK = 1 << 22


def _log_softmax_at(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(log softmax(logits)[targets], logsumexp(logits), rows)``, in float32, the logsumexp taken
    ``rows`` rows at a time so its temporaries stay small."""
    rows = max(1, _TOKEN_LOGPS_CHUNK // max(1, logits[:1].numel()))
    lse = torch.cat([torch.logsumexp(part.float(), dim=-1) for part in logits.split(rows)])
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - lse, lse, rows


def _write_logit_gradient(out: Tensor, logits: Tensor, lse: Tensor, g: Tensor, targets: Tensor, rows: int) -> None:
    """Write into ``out`` (``logits`` itself allowed) the gradient of ``sum_t g_t log softmax(logits_t)[target_t]``
    in the logits, ``g * (onehot - softmax)``, ``rows`` rows at a time."""
    for part_out, part, part_lse, part_g in zip(out.split(rows), logits.split(rows), lse.split(rows), g.split(rows)):
        part_out.copy_((part.float() - part_lse.unsqueeze(-1)).exp_().mul_(-part_g.unsqueeze(-1)))
    out.scatter_add_(-1, targets.unsqueeze(-1), g.unsqueeze(-1).to(out.dtype))


class _TokenLogps(torch.autograd.Function):
    """``logit[target] - logsumexp(logit)``, with a lean backward.

    Autograd's backward of ``gather`` and ``logsumexp`` would allocate three to four tensors of the
    size of ``logits`` (a scattered one-hot gradient, ``exp(logit - lse)``, their product and sum);
    this one writes the gradient ``g * (onehot - softmax)`` straight into one buffer, and both
    passes work through the rows in chunks, so temporaries stay small.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        token, lse, ctx.rows = _log_softmax_at(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        return token

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _write_logit_gradient(grad_logits, logits, lse, grad, targets, ctx.rows)
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


class HeadChunk(NamedTuple):
    """One chunk of the fused head: ``rows`` of the hidden states, which hold all the tokens of ``groups``."""

    rows: Tensor
    groups: Tensor


def chunks_of_groups(group: Tensor, groups: int, rows: int) -> list[HeadChunk] | None:
    """Consecutive groups per chunk, as many as fit in ``rows`` rows (at least one), from each row's
    group ``group`` ``[N]``; None when a group alone has more than twice ``rows`` rows (its chunk
    would hold more than twice the logits the chunk size allows)."""
    sizes = torch.bincount(group, minlength=groups).tolist()
    if max(sizes, default=0) > 2 * rows:
        return None
    members: list[list[int]] = [[]]
    filled = 0
    for g, size in enumerate(sizes):
        if members[-1] and filled + size > rows:
            members.append([])
            filled = 0
        members[-1].append(g)
        filled += size
    chunks = []
    for m in members:
        ids = torch.tensor(m, device=group.device)
        chunks.append(HeadChunk(torch.isin(group, ids).nonzero().squeeze(-1), ids))
    return chunks


class _FusedHeadLoss(torch.autograd.Function):
    """The loss and its gradients in one pass over the LM head, a chunk of whole groups at a time.

    Each chunk's logits ``h W^T + b`` are computed once (the first of the head's three matrix
    products); its token log-probs give the chunk's groups their loss terms, and with them the
    gradient of the loss in each token log-prob, ``g``; the gradient in the logits,
    ``g * (onehot - softmax)``, is written over the logits themselves, and gives the chunk's
    hidden-state and weight gradients (the other two products). Backward only scales the stored
    gradients by the loss's own gradient, so no logits are kept or recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, extra, targets, chunks, loss_of):
        token = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        extra_leaf = extra.detach().requires_grad_() if extra is not None else None
        grad_extra = torch.zeros_like(extra) if extra is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for chunk in chunks:
            h = hidden[chunk.rows]
            chunk_targets = targets[chunk.rows]
            logits = nn.functional.linear(h, weight, bias)
            chunk_token, lse, rows = _log_softmax_at(logits, chunk_targets)
            token[chunk.rows] = chunk_token
            leaf = chunk_token.detach().requires_grad_()
            with torch.enable_grad():
                placed = token.detach().index_put((chunk.rows,), leaf)
                chunk_loss = loss_of(placed, extra_leaf)[chunk.groups].sum()
                wanted = [leaf] if extra_leaf is None else [leaf, extra_leaf]
                grads = torch.autograd.grad(chunk_loss, wanted, allow_unused=True)
            g = grads[0] if grads[0] is not None else torch.zeros_like(leaf)
            if extra_leaf is not None and grads[1] is not None:
                grad_extra += grads[1]
            loss += chunk_loss.detach()
            _write_logit_gradient(logits, logits, lse, g, chunk_targets, rows)
            grad_hidden[chunk.rows] = (logits @ weight.to(logits.dtype)).to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(logits.t().to(weight.dtype), h.to(weight.dtype))
            if grad_bias is not None:
                grad_bias += logits.sum(0).to(bias.dtype)
            del logits, h  # freed before the next chunk's logits are allocated, not after
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_extra)
        ctx.mark_non_differentiable(token)
        return loss, token

    @staticmethod
    def backward(ctx, grad_loss, _grad_token):
        if bool(grad_loss == 1):  # the usual case: hand the gradients on without a copy of the weight's
            return (*ctx.saved_tensors, None, None, None)
        return (*(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors), None, None, None)


def fused_head_loss(
    hidden: Tensor,
    targets: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    extra: Tensor | None,
    chunks: list[HeadChunk],
    loss_of: Callable[[Tensor, Tensor | None], Tensor],
) -> tuple[Tensor, Tensor]:
    """A loss of per-group terms and the token log-probs ``log softmax(h W^T + b)[target]``, with the
    LM head's three matrix products and no logits kept for backward.

    ``hidden`` ``[N, H]`` are the head's inputs and ``targets`` ``[N]`` their next tokens; each row
    belongs to one group (a preference pair: its chosen and rejected tokens), and each chunk in
    ``chunks`` holds every row of its groups. ``loss_of(token_logps [N], extra)`` returns one term
    per group, ``[G]``; the loss is their sum, and a group's term must depend only on its own rows'
    log-probs and its own entries of ``extra`` (a tensor the terms share with the rest of the model,
    such as reward-head outputs), since each chunk evaluates ``loss_of`` with the other rows' values
    not yet known. Returns ``(loss, token_logps)``; the log-probs carry no gradient (the loss does).

    Against :func:`chunked_token_logps`, which recomputes each chunk's logits in backward (four
    products), this needs the loss while the chunk is there: every objective whose loss is a sum over
    pairs can give it. The peak is one chunk's logits, reused for their gradient.
    """
    return _FusedHeadLoss.apply(hidden, weight, bias, extra, targets, chunks, loss_of)
