"""Packed batches through the model: the same log-probs, rewards and gradients as padded ones.

Across the architecture matrix, with left and right padding, with the one-piece and the chunked
head; an architecture whose forward cannot keep packed sequences apart (OPT in transformers 5)
trains padded, with one notice, and still gets the right values.
"""

from __future__ import annotations

import logging

import pytest
import torch
from architectures import ARCHITECTURES, build
from test_chunked_head import VOCAB, assert_same, values_and_grads, with_head, with_lora


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_packed_batches_give_the_padded_values_and_gradients(name, caplog):
    model = with_head(build(name, VOCAB))
    with caplog.at_level(logging.WARNING, logger="drdo_lightning.models"):
        for side in ("left", "right"):
            reference = values_and_grads(model, side, chunk_rows=None)
            assert_same(reference, values_and_grads(model, side, None, packed=True), f"{name}, {side} padding, packed")
            assert_same(reference, values_and_grads(model, side, 4, packed=True), f"{name}, {side} padding, packed, chunked")
    notices = [r for r in caplog.records if "packed sequences" in r.getMessage()]
    if name.startswith("opt"):  # transformers 5's OPT builds its causal mask without the position ids
        assert model._packs is False and len(notices) == 1
    else:
        assert model._packs is True and notices == []


def test_packed_batches_under_lora_adapters():
    model = with_lora(with_head(build("llama", VOCAB)))
    reference = values_and_grads(model, "right", None)
    assert_same(reference, values_and_grads(model, "right", None, packed=True), "llama with LoRA, packed")
    assert model._packs is True
