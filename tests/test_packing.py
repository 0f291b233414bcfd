"""Padding-free packing: the packing itself, and the packed forward against the padded one on
every architecture in ``architectures.py`` with eager and sdpa attention.

The reference is the padded forward the models module runs (attention mask, positions counting
real tokens); packed, the same real tokens must get the same logits, final hidden states and
parameter gradients, or ``supports_packing`` must say no.
"""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, build
from transformers.masking_utils import find_packed_sequence_indices

from drdo_lightning.packing import ROW_LENGTH_LIMIT, balanced_rows, pack, supports_packing

VOCAB = 96
# Rows of very different lengths, one empty, padded to 14.
LENGTHS = [13, 2, 9, 1, 0, 6, 4]
WIDTH = 14
# Where transformers 5 builds the causal mask without the position ids (OPT passes none to
# create_causal_mask), so packed sequences would attend each other.
UNPACKABLE = {"opt-125m-shape", "opt-350m-shape"}
TOLERANCE = 1e-5


def padded_batch(lengths: list[int], width: int, side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[N, width]``: random tokens (never 0, the pad id) padded on ``side``.
    Row ``i`` holds the same tokens whichever the side."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (n,), generator=generator)
        at = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, at], mask[i, at] = tokens, 1
    return ids, mask


def close(got: torch.Tensor, expected: torch.Tensor, floor: float = 1.0) -> bool:
    """Within ``TOLERANCE`` relative to the expected tensor's largest magnitude (or ``floor``, if larger)."""
    return bool((got - expected).abs().max() <= TOLERANCE * max(floor, expected.abs().max().item()))


# --- the packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("capacity", [None, 16, 40])
def test_every_real_token_lands_once_at_its_position(side, capacity):
    ids, mask = padded_batch(LENGTHS, WIDTH, side)
    packing = pack(mask, capacity)
    rows, length = packing.position_ids.shape
    assert max(LENGTHS) <= length <= (capacity or int(ROW_LENGTH_LIMIT * max(LENGTHS)))
    assert packing.real.any(-1).all() and packing.real[:, -1].any()  # rows as long as the fullest one
    # Each real token exactly once, in a slot of its own; every other slot is leftover.
    assert packing.packed_index.unique().numel() == packing.packed_index.numel() == sum(LENGTHS)
    assert int(packing.real.sum()) == sum(LENGTHS)
    packed = packing.pack_tokens(ids, pad_value=0)
    assert torch.equal(packed.flatten()[packing.packed_index], ids[mask.bool()])
    assert torch.equal(packing.unpack(packed), ids[mask.bool()])
    assert torch.equal(packing.unpack(packed, fill=0), ids)
    assert (packed[~packing.real] == 0).all()
    # Positions are what the padded layout gives each real token: restarting at 0 per sequence.
    padded_positions = (mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(packing.unpack(packing.position_ids), padded_positions[mask.bool()])
    # Each sequence is contiguous in one packed row, in order.
    for i, n in enumerate(LENGTHS):
        slots = packing.packed_index[(packing.real_index // WIDTH) == i]
        assert slots.numel() == n
        if n:
            assert torch.equal(slots, torch.arange(n) + slots[0]) and slots[0] // length == slots[-1] // length
            assert (packing.rows.flatten()[slots] == i).all()
    # No row over capacity, and no more rows than a non-empty sequence each.
    assert rows <= sum(n > 0 for n in LENGTHS)


def test_balanced_rows():
    # 16 tokens: 2 balanced rows of 8 (1 row of 16 is over capacity 12); longest first into the emptier row
    assert balanced_rows([5, 4, 3, 3, 1, 0], 12) == [[0, 3], [1, 2, 4]]
    assert balanced_rows([5, 4, 3, 3, 1, 0], 16) == [[0, 1, 2, 3, 4]]  # one row, no leftover
    assert balanced_rows([2, 2, 2], 2) == [[0], [1], [2]]
    assert balanced_rows([1, 3, 1, 3], 4) == [[1, 0], [3, 2]]  # ties by index
    assert balanced_rows([], 4) == []
    # 39 tokens under capacity 12: 3 rows cannot hold them, 4 balanced rows of at most 10 take 40 slots
    lengths = [9, 7, 6, 5, 5, 4, 2, 1]
    rows = balanced_rows(lengths, 12)
    assert rows == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [sum(lengths[i] for i in row) for row in rows] == [10, 9, 10, 10]


def test_packing_is_deterministic_and_blind_to_the_padding_side():
    right = padded_batch(LENGTHS, WIDTH, "right")
    left = padded_batch(LENGTHS, WIDTH, "left")
    a, b, c = pack(right[1]), pack(right[1]), pack(left[1])
    for name in ("packed_index", "position_ids", "rows"):
        assert torch.equal(getattr(a, name), getattr(b, name)) and torch.equal(getattr(a, name), getattr(c, name))
    assert torch.equal(a.pack_tokens(right[0]), c.pack_tokens(left[0]))


def test_leftover_slots_form_their_own_segment():
    """transformers' segment finder (what its mask utilities use) sees one segment per sequence and
    one per row's leftover slots, so no real token attends a leftover slot or another sequence."""
    _, mask = padded_batch(LENGTHS, WIDTH, "right")
    packing = pack(mask, capacity=16)
    assert (~packing.real).any()
    segments = find_packed_sequence_indices(packing.position_ids)
    for r in range(segments.shape[0]):
        rows, segment = packing.rows[r], segments[r]
        for s in segment.unique():
            members = rows[segment == s].unique()
            assert members.numel() == 1, f"row {r}: segment {s} mixes sequences {members.tolist()}"
        # Leftover slots only at the end of a row.
        real = packing.real[r]
        assert torch.equal(real, real.sort(descending=True, stable=True).values)


def test_padding_fraction_and_capacity_errors():
    _, mask = padded_batch(LENGTHS, WIDTH, "left")
    packing = pack(mask)
    real = sum(LENGTHS)
    rows, length = packing.position_ids.shape
    assert packing.padding_fraction.padded == pytest.approx(1 - real / (len(LENGTHS) * WIDTH))
    assert packing.padding_fraction.packed == pytest.approx(1 - real / (rows * length))
    assert packing.padding_fraction.packed < packing.padding_fraction.padded
    with pytest.raises(ValueError, match="longest sequence"):
        pack(mask, capacity=12)
    empty = pack(torch.zeros(2, 5, dtype=torch.long))
    assert empty.position_ids.shape[0] == 0 and empty.unpack(torch.zeros(0, 0, 3), fill=0.0).shape == (2, 5, 3)


def test_unpack_carries_gradients_back():
    _, mask = padded_batch(LENGTHS, WIDTH, "right")
    packing = pack(mask)
    packed = torch.randn(*packing.position_ids.shape, 3, requires_grad=True)
    packing.unpack(packed, fill=0.0).sum().backward()
    assert torch.equal(packed.grad, packing.real.unsqueeze(-1).float().expand_as(packed))


# --- the packed forward across architectures ---------------------------------------------------


def forward(lm, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, final hidden state)``, the latter captured on its way into the LM head."""
    captured: list[torch.Tensor] = []
    hook = lm.get_output_embeddings().register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        logits = lm(**inputs, use_cache=False).logits
    finally:
        hook.remove()
    return logits, captured[0]


def gradients(lm, logits: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    lm.zero_grad(set_to_none=True)
    (logits * weights).sum().backward()
    return {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_packed_forward_matches_the_padded_one(name, attention):
    lm = build(name, VOCAB)
    try:
        lm.set_attn_implementation(attention)
    except ValueError as error:  # e.g. Gemma-2 has no sdpa path in transformers 5
        pytest.skip(str(error).split(".")[0])
    supported = supports_packing(lm)
    for side in ("right", "left"):
        ids, mask = padded_batch(LENGTHS, WIDTH, side)
        real = mask.bool()
        packing = pack(mask)
        logits, hidden = forward(lm, input_ids=ids, attention_mask=mask,
                                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        packed_logits, packed_hidden = forward(lm, input_ids=packing.pack_tokens(ids, pad_value=0),
                                               attention_mask=None, position_ids=packing.position_ids)
        matches = close(packing.unpack(packed_logits), logits[real]) and close(packing.unpack(packed_hidden), hidden[real])
        assert supported == matches, f"{name}/{attention}: supports_packing says {supported}, the forwards match: {matches}"
        assert matches == (name not in UNPACKABLE), f"{name}/{attention} ({side} padding): packing support changed"
        if not matches:
            continue
        weights = torch.randn(logits[real].shape, generator=torch.Generator().manual_seed(1))
        expected = gradients(lm, logits[real], weights)
        got = gradients(lm, packing.unpack(packed_logits), weights)
        assert expected.keys() == got.keys()
        off = [k for k in expected if not close(got[k], expected[k], floor=1e-12)]
        assert not off, f"{name}/{attention} ({side} padding): gradients differ for {off}"
