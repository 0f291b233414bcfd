"""Padding-free packing: a padded ``[N, T]`` batch's sequences laid end to end in fewer rows.

A preference batch is chosen and rejected concatenated and padded to its longest sequence, so much
of it can be padding that the model computes on and throws away. :func:`pack` puts the real tokens
into ``R <= N`` rows of balanced fill (:func:`balanced_rows`), each sequence's position ids
restarting at 0. Called with ``attention_mask=None`` and no cache, transformers' mask utilities
read those restarts as sequence boundaries and build block-diagonal causal masks, so every token
attends exactly the tokens it attends in the padded layout, at the same positions: the model gives
the same outputs at every real token (see :func:`supports_packing` for the models that do).

A packed row is never longer than ``capacity``, by default 1.5 times the batch's longest sequence:
packing trades rows for fewer padded slots, not for one long row whose attention grows
quadratically with its length.

Typical use::

    packing = pack(attention_mask)
    out = lm(input_ids=packing.pack_tokens(input_ids, pad_token_id), attention_mask=None,
             position_ids=packing.position_ids, use_cache=False)
    logits = packing.unpack(out.logits, fill=0.0)  # [N, T, V] again, 0 at padding
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

# The probe in supports_packing accepts the packed forward when its distance from the padded one is at
# most this share of the distance a forward whose sequences attend each other has from it: an error
# of the packed forward's own (a mask that ignores the packing) is as large as that distance, while
# different kernel shapes or precision move the outputs far less (0-3% in bf16 on the test models).
PROBE_MARGIN = 0.1

# Packed rows may be this many times the batch's longest sequence (see pack).
ROW_LENGTH_LIMIT = 1.5


class PaddingFraction(NamedTuple):
    padded: float  # share of the padded [N, T] slots that are padding
    packed: float  # share of the packed [R, L] slots that are leftover (no real token)


@dataclass(frozen=True)
class Packing:
    """Where each real token of a padded ``[N, T]`` batch sits in the packed ``[R, L]`` rows.

    ``real_index`` ``[M]``: the real tokens' flat indices into the padded ``[N * T]`` layout, in its
    row-major order (that of ``padded[attention_mask.bool()]``); ``packed_index`` ``[M]``: the same
    tokens' flat indices into the packed ``[R * L]`` layout, so
    ``packed.flatten(0, 1)[packed_index] == padded.flatten(0, 1)[real_index]``.
    ``position_ids`` ``[R, L]``: each real token's position in its sequence (what
    ``(attention_mask.cumsum(-1) - 1)`` gives it in the padded layout), and for a row's leftover
    slots at its end their own positions from 0, so they form a segment of their own that no real
    token attends (coming last, they are out of causal reach anyway; their own segment keeps
    segment finders and varlen kernels from counting them in). ``rows`` ``[R, L]``: the padded row
    each slot's token came from, -1 for leftover slots (for per-sequence sums in the packed layout).
    ``shape``: the padded ``(N, T)``.
    """

    real_index: Tensor
    packed_index: Tensor
    position_ids: Tensor
    rows: Tensor
    shape: tuple[int, int]

    @property
    def real(self) -> Tensor:
        """``[R, L]`` bool: the packed slots that hold a real token."""
        return self.rows >= 0

    @property
    def padding_fraction(self) -> PaddingFraction:
        """How much of the batch is padding before and after packing."""
        n, t = self.shape
        r, length = self.position_ids.shape
        real = self.real_index.numel()
        return PaddingFraction(1 - real / (n * t) if n * t else 0.0, 1 - real / (r * length) if r * length else 0.0)

    def pack_tokens(self, values: Tensor, pad_value: float | int | bool = 0) -> Tensor:
        """``[N, T, ...]`` padded per-token values (input ids, labels, a keep mask) as ``[R, L, ...]``,
        ``pad_value`` in the leftover slots (for input ids: a token id the embedding accepts)."""
        n, t = self.shape
        if tuple(values.shape[:2]) != (n, t):
            raise ValueError(f"values of shape {tuple(values.shape)} do not match the packed batch's {(n, t)}")
        r, length = self.position_ids.shape
        packed = values.new_full((r * length, *values.shape[2:]), pad_value)
        packed[self.packed_index] = values.flatten(0, 1)[self.real_index]
        return packed.unflatten(0, (r, length))

    def unpack(self, packed: Tensor, fill: float | int | bool | None = None) -> Tensor:
        """``[R, L, ...]`` packed per-token values (logits, hidden states) back at the real tokens.

        With ``fill=None``: ``[M, ...]`` in the padded layout's row-major order of real tokens, as
        ``padded[attention_mask.bool()]`` would give; otherwise ``[N, T, ...]`` with ``fill`` at padding.
        Differentiable (a gather), so gradients flow back to the packed forward.
        """
        r, length = self.position_ids.shape
        if tuple(packed.shape[:2]) != (r, length):
            raise ValueError(f"packed values of shape {tuple(packed.shape)} do not match the packing's {(r, length)}")
        values = packed.flatten(0, 1)[self.packed_index]
        if fill is None:
            return values
        n, t = self.shape
        padded = packed.new_full((n * t, *packed.shape[2:]), fill)
        padded = padded.index_copy(0, self.real_index, values)
        return padded.unflatten(0, (n, t))


def balanced_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens, as few slots as possible.

    For each row count from the fewest that could hold the tokens, the sequences go longest first
    into the least-filled row (ties by index: deterministic); the packed length is the fullest
    row's. The row count with the fewest slots (rows x packed length) wins, the fewer rows on a tie.
    Balancing the rows, rather than filling each in turn, keeps the last row from being mostly
    leftover. Zero lengths are left out.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    best: tuple[int, list[list[int]]] | None = None
    for count in range(max(1, -(-sum(lengths) // capacity)), len(order) + 1):
        rows: list[list[int]] = [[] for _ in range(count)]
        fill = [0] * count
        for i in order:
            r = min(range(count), key=lambda r: (fill[r], r))
            rows[r].append(i)
            fill[r] += lengths[i]
        if max(fill) <= capacity and (best is None or count * max(fill) < best[0]):
            best = (count * max(fill), rows)
    return best[1]


def pack(attention_mask: Tensor, capacity: int | None = None) -> Packing:
    """How to pack a padded batch's real tokens (``attention_mask`` ``[N, T]``, nonzero at real
    tokens, left or right padding alike) into rows of at most ``capacity`` slots (:func:`balanced_rows`).

    ``capacity`` defaults to ``ROW_LENGTH_LIMIT`` times the longest sequence: rows a little longer
    than the longest sequence let the rows balance (leftover under 5% on long-tailed lengths, against
    about 10% at exactly the longest), while attention, quadratic in a row's length, still costs less
    than the padded rows' did. Each sequence
    keeps its real tokens in order, and each real token its padded-layout position (the count of
    real tokens before it in its row), so models with absolute positions see what padded rows show
    them. Deterministic in the sequences' lengths, which are read on the host (a device sync).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [N, T], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    n, t = mask.shape
    device = mask.device
    lengths = mask.sum(-1).tolist()
    longest = max(lengths, default=0)
    capacity = int(longest * ROW_LENGTH_LIMIT) if capacity is None else capacity
    if capacity < longest:
        raise ValueError(f"capacity {capacity} is shorter than the batch's longest sequence ({longest} tokens)")
    bins = balanced_rows(lengths, capacity)
    capacity = max((sum(lengths[i] for i in members) for members in bins), default=0)  # the fullest row's length
    # Each padded row's first flat slot in the packed layout, and each packed row's used slots.
    start = [0] * n
    used = []
    for b, members in enumerate(bins):
        offset = b * capacity
        for i in members:
            start[i] = offset
            offset += lengths[i]
        used.append(offset - b * capacity)
    real_index = mask.flatten().nonzero().squeeze(-1)
    positions = (mask.long().cumsum(-1) - 1).flatten()[real_index]
    padded_row = real_index // t if t else real_index
    packed_index = torch.tensor(start, dtype=torch.long, device=device)[padded_row] + positions
    # Leftover slots count from 0 after the row's last sequence: their own segment.
    slots = torch.arange(capacity, device=device)
    used_t = torch.tensor(used, dtype=torch.long, device=device).reshape(-1, 1)
    position_ids = (slots - used_t).clamp(min=0).expand(len(bins), capacity).clone()
    position_ids.view(-1)[packed_index] = positions
    rows = torch.full((len(bins) * capacity,), -1, dtype=torch.long, device=device)
    rows[packed_index] = padded_row
    return Packing(real_index, packed_index, position_ids, rows.view(len(bins), capacity), (n, t))


def supports_packing(lm: nn.Module) -> bool:
    """Whether ``lm``'s forward gives packed rows the outputs their padded layout gets.

    A one-time probe on two short sequences (12 and 3 tokens): their logits from the padded
    forward (attention mask, positions counting real tokens), from the packed one (one row, both
    sequences and 2 leftover slots, ``attention_mask=None``), and from that row with an all-ones
    attention mask, where the second sequence attends the first. The packed forward passes when it
    is within ``PROBE_MARGIN`` of the padded one, measured in units of how far the cross-attending
    row lies from it: a measure that holds in any precision, and fails where the model builds its
    causal mask without the position ids (OPT in transformers 5), ignores position ids, or runs an
    attention implementation without packed-sequence support. A model whose outputs barely depend
    on their context (a tiny random one in half precision, say) can fail it too: it then keeps the
    padded path, which is never wrong.

    Three forwards without gradients, in eval mode (each module's mode restored afterwards): under
    a sharded strategy every rank must call it.
    """
    if not accepts(lm, "position_ids"):
        return False
    embeddings = lm.get_input_embeddings()
    vocab, device = embeddings.num_embeddings, embeddings.weight.device
    first = [(7 * i + 3) % vocab for i in range(12)]
    second = [(5 * i + 11) % vocab for i in range(3)]
    input_ids = torch.tensor([first, second + [0] * 9], device=device)
    attention_mask = torch.tensor([[1] * 12, [1] * 3 + [0] * 9], device=device)
    packing = pack(attention_mask, capacity=17)  # one row: 12 + 3 tokens
    packed_ids = packing.pack_tokens(input_ids)
    modes = {module: module.training for module in lm.modules()}
    lm.eval()
    try:
        with torch.no_grad():
            padded = lm(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
            packed, crossed = (
                packing.unpack(lm(input_ids=packed_ids, attention_mask=mask, position_ids=packing.position_ids,
                                  use_cache=False).logits).double()
                for mask in (None, torch.ones_like(packed_ids)))
    finally:
        for module, training in modes.items():
            module.training = training
    expected = padded[attention_mask.bool()].double()
    error, contamination = (packed - expected).abs().max(), (crossed - expected).abs().max()
    return bool(torch.isfinite(packed).all() and error <= PROBE_MARGIN * contamination)


def accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s forward takes the keyword ``name`` (by name or through ``**kwargs``)."""
    parameters = inspect.signature(module.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
