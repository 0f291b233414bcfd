"""The chunked LM head: the same log-probs and gradients as the one-piece head, without ``[N, V]`` logits.

Across every architecture in ``architectures.py`` (soft-capping, logit scales, a projected hidden
state, biased heads), with left and right padding; with tied embeddings; and for a model whose
post-head transform it cannot reproduce, the fallback with its notice.
"""

from __future__ import annotations

import logging

import pytest
import torch
from architectures import ARCHITECTURES, build
from test_architectures import rows
from transformers import AutoModelForCausalLM, GPT2Config

from drdo_lightning import CausalLMWithRewardHead
from drdo_lightning.heads import Wanted, head_chunk_rows, sequence_values
from drdo_lightning.models import head_input_width, remove_dropout

VOCAB = 96


def with_head(lm) -> CausalLMWithRewardHead:
    remove_dropout(lm)
    torch.manual_seed(1)
    return CausalLMWithRewardHead(lm, CausalLMWithRewardHead.new_reward_head(head_input_width(lm))).train()


def values_and_grads(model: CausalLMWithRewardHead, side: str, chunk_rows: int | None, **options):
    """Every output of ``sequence_values`` (sum and mean forms, unlikelihood, prompt log-probs) and the
    parameters' gradients of a loss that weighs each differently."""
    ids, mask, labels, _ = rows(model.lm, side)
    model.zero_grad()
    z, rewards, unlikelihood, prompt, *_ = sequence_values(
        model, ids, mask, labels, Wanted(token_unlikelihood=True, prompt_logps=True), chunk_rows=chunk_rows, **options)
    mean_z = sequence_values(model, ids, mask, labels, Wanted(average=True), chunk_rows=chunk_rows, **options).logps
    (z @ torch.tensor([0.3, -1.0, 0.5]) + rewards.sum() + 0.1 * unlikelihood.sum() + 0.2 * prompt.sum() + mean_z.sum()).backward()
    values = torch.stack([z, rewards, unlikelihood, prompt, mean_z]).detach()
    return values, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(reference, chunked, msg: str, tolerance: float = 1e-5) -> None:
    (want, want_grads), (got, got_grads) = reference, chunked
    torch.testing.assert_close(got, want, atol=tolerance, rtol=1e-6, msg=msg)  # sums of tens of log-probs in the hundreds
    assert got_grads.keys() == want_grads.keys()
    # Relative to the largest gradient entry of the model: some gradients are rounding noise around
    # zero whatever the head (a key projection's bias cancels in the softmax), and only the scale
    # of the real ones makes a difference meaningful.
    scale = max(grad.abs().max() for grad in want_grads.values())
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max() <= tolerance * scale, f"{msg}: gradient of {name}"


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_chunked_head_equals_the_one_piece_head_across_architectures(name):
    model = with_head(build(name, VOCAB))
    for side in ("left", "right"):
        reference = values_and_grads(model, side, chunk_rows=None)
        # 4 rows a chunk: several chunks, the last one partial
        assert_same(reference, values_and_grads(model, side, chunk_rows=4), f"{name}, {side} padding")
    assert model._head_reproduced is True  # the chunked path really ran


def test_chunked_head_with_tied_embeddings():
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    model = with_head(lm)
    assert_same(values_and_grads(model, "right", None), values_and_grads(model, "right", 5), "tied gpt2")


def test_no_logits_of_the_whole_batch_are_kept_for_backward():
    """What autograd saves for backward: no tensor with the vocabulary as last dimension larger than one chunk."""
    model = with_head(build("llama", VOCAB))
    ids, mask, labels, _ = rows(model.lm, "right")
    model.head_is_reproduced(ids)  # its probe runs without grad; nothing of it is saved

    def saved_vocab_rows(chunk_rows):
        rows_seen = []
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):  # the head's weight (a view [H, V]) is saved too, and is not logits
            if t.dim() >= 1 and t.shape[-1] == VOCAB and t.untyped_storage().data_ptr() not in weights:
                rows_seen.append(t.numel() // VOCAB)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sequence_values(model, ids, mask, labels, chunk_rows=chunk_rows)
        return rows_seen

    responses = int((labels[:, 1:] != -100).sum())
    assert max(saved_vocab_rows(None)) >= responses  # the one-piece head keeps every response position's logits
    assert saved_vocab_rows(2) == []  # the chunked head keeps none: backward recomputes them


def test_a_head_it_cannot_reproduce_falls_back_with_one_notice(caplog):
    lm = build("llama", VOCAB)
    model = with_head(lm)
    reference = values_and_grads(model, "right", None)
    original = type(lm).forward

    def forward_with_a_logit_offset(self, *args, **kwargs):  # an architecture's transform we do not know
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 1.5 + 0.25
        return out

    lm.forward = forward_with_a_logit_offset.__get__(lm)
    with caplog.at_level(logging.WARNING, logger="drdo_lightning.models"):
        sequence_values(model, *rows(lm, "right")[:3], chunk_rows=4)
        sequence_values(model, *rows(lm, "right")[:3], chunk_rows=4)
    assert model._head_reproduced is False
    notices = [r for r in caplog.records if "chunked LM head" in r.getMessage()]
    assert len(notices) == 1 and "LlamaForCausalLM" in notices[0].getMessage()
    lm.forward = original.__get__(lm)
    model._head_reproduced = None
    assert_same(reference, values_and_grads(model, "right", 4), "llama after the probe passes again")


def test_head_chunk_rows_follows_the_setting_and_the_vocabulary():
    small, large = build("llama", VOCAB), build("llama", 1 << 17)
    assert head_chunk_rows(small, False) is None and head_chunk_rows(large, False) is None
    assert head_chunk_rows(small, True) >= 1
    assert head_chunk_rows(large, True) * (1 << 17) <= 1 << 26  # a chunk's logits stay bounded


def with_lora(model: CausalLMWithRewardHead) -> CausalLMWithRewardHead:
    """``model`` with rank-4 adapters on every linear layer, set to count (they start as a no-op)."""
    pytest.importorskip("peft")
    from drdo_lightning.lora import add_adapters

    model.lm = add_adapters(model.lm, {"r": 4, "alpha": 8, "target_modules": "all-linear"})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


def test_chunked_head_under_lora_adapters():
    model = with_lora(with_head(build("qwen2", VOCAB)))
    reference = values_and_grads(model, "left", None)
    assert any("lora_B" in name for name in reference[1])
    assert_same(reference, values_and_grads(model, "left", 3), "qwen2 with LoRA")
