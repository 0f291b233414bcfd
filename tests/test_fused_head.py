"""The fused LM head: the loss, its gradients and the log-probs of the one-piece head, with the head's
gradients computed in the forward pass (three head matrix products, one chunk of logits).

Across every architecture in ``architectures.py`` (those whose logits are transformed after the head
take the chunked head instead, with the same values), left and right padding, packed and padded;
each objective's loss as per-pair terms that depend on their own pair only; and a training step of
the modules, fused against unfused.
"""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, build
from test_chunked_head import VOCAB, assert_same, with_head

from drdo_lightning import CDPO, DPO, DRDO, EDPO, IPO, ORPO, RDPO, RPO, SFT, Distill, OracleRewardModel, SimPO
from drdo_lightning.objectives import PairOutputs

# Two pairs (chosen rows 0-1, rejected rows 2-3) of different prompt and response lengths.
PROMPTS, RESPONSES = [3, 5, 2, 4], [4, 2, 6, 3]
ORACLE = (torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.3]))


def pair_rows(vocab: int, side: str):
    generator = torch.Generator().manual_seed(0)
    length = max(p + r for p, r in zip(PROMPTS, RESPONSES))
    ids = torch.zeros(4, length, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        start = length - (p + r) if side == "left" else 0
        ids[b, start : start + p + r] = torch.randint(1, vocab, (p + r,), generator=generator)
        mask[b, start : start + p + r] = 1
        labels[b, start + p : start + p + r] = ids[b, start + p : start + p + r]
    return ids, mask, labels


def pair_terms(values):
    """A loss per pair that every value reaches with a gradient of its own: a log-sigmoid of the
    log-prob margin (DPO-like, small enough not to saturate on large logits), the rejected response's
    token-level unlikelihood (DRDO's form) and the reward margin's squared distance to a target."""
    z, rewards, unlikelihood = values
    margin = torch.nn.functional.logsigmoid(0.01 * (z[:2] - z[2:]))
    return -margin + 0.1 * unlikelihood[2:] + 0.05 * z[:2] + (rewards[:2] - rewards[2:] - ORACLE[0]).square()


def loss_values_grads(model, side: str, chunk_rows: int | None, fused: bool, packed: bool = False):
    ids, mask, labels = pair_rows(VOCAB, side)
    model.zero_grad()
    if fused:
        loss, values = model.loss_and_sequence_logps(ids, mask, labels, pair_terms, groups=2, token_unlikelihood=True,
                                                     chunk_rows=chunk_rows, packed=packed)
    else:
        values = model.sequence_logps(ids, mask, labels, token_unlikelihood=True, chunk_rows=chunk_rows, packed=packed)
        loss = pair_terms(values).sum()
    loss.backward()
    return (torch.cat([loss.detach()[None], *(v.detach() for v in values)]),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fused_head_equals_the_one_piece_head_across_architectures(name):
    model = with_head(build(name, VOCAB))
    ids, _, _ = pair_rows(VOCAB, "right")
    chunk_rows = 9  # the largest pair has 12 kept rows: each pair a chunk of its own, none over twice the chunk
    for side in ("left", "right"):
        for packed in (False, True):
            reference = loss_values_grads(model, side, None, fused=False)
            got = loss_values_grads(model, side, chunk_rows, fused=True, packed=packed)
            # The chunked head (four products) differs from the one-piece head by as much on this loss.
            assert_same(reference, got, f"{name}, {side} padding, packed {packed}", tolerance=5e-5)
    # Heads whose logits the model transforms afterwards (soft-capping, scales) keep the chunked head.
    transformed = name in ("gemma2", "gemma3-text", "cohere", "granite")
    assert model.fuses_head(ids) is not transformed


def test_fused_head_keeps_no_logits_for_backward():
    """What autograd saves: no tensor with the vocabulary as its last dimension but the head's weight."""
    model = with_head(build("llama", VOCAB))
    ids, mask, labels = pair_rows(VOCAB, "right")
    model.head_is_reproduced(ids)
    saved = []

    def keep(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.loss_and_sequence_logps(ids, mask, labels, pair_terms, groups=2, token_unlikelihood=True, chunk_rows=9)
    assert saved, "nothing saved: the hook saw no graph"
    head_weight = tuple(model.lm.get_output_embeddings().weight.shape)
    # The fused function saves gradients: the head weight's own shape is allowed, nothing else of width V.
    assert all(shape[-1] != VOCAB or shape == head_weight[::-1] or shape == head_weight for shape in saved), saved


def test_a_pair_longer_than_two_chunks_takes_the_chunked_head():
    model = with_head(build("llama", VOCAB))
    want = loss_values_grads(model, "right", None, fused=False)
    # 3 rows a chunk: the pairs (up to 12 kept rows) do not fit twice over, so the values come from the chunked head.
    assert_same(want, loss_values_grads(model, "right", 3, fused=True), "llama, long pairs", tolerance=5e-5)


def random_outputs(pairs: int, generator: torch.Generator) -> PairOutputs:
    def draw(low: float = -30.0, high: float = -1.0):
        return low + (high - low) * torch.rand(pairs, generator=generator)

    return PairOutputs(
        chosen_logps=draw(), rejected_logps=draw(), chosen_rewards=draw(-2, 2), rejected_rewards=draw(-2, 2),
        rejected_token_unlikelihood=draw(-3.0, -0.1), chosen_lengths=torch.tensor([4, 7, 2]),
        chosen_prompt_logps=draw(), chosen_prompt_lengths=torch.tensor([3, 1, 5]),
    )


OBJECTIVES = {
    "sft": (SFT, {}),
    "oracle": (OracleRewardModel, {}),
    "drdo": (DRDO, {}),
    "drdo_token_unlikelihood": (DRDO, {"preference_form": "token_unlikelihood", "distill_form": "bt_soft"}),
    "dpo": (DPO, {}),
    "cdpo": (CDPO, {"label_smoothing": 0.1}),
    "rdpo": (RDPO, {"flip_rate": 0.2}),
    "rpo_token": (RPO, {"nll_reduction": "token"}),
    "ipo": (IPO, {}),
    "distill": (Distill, {}),
    "simpo": (SimPO, {}),
    "orpo_prompt": (ORPO, {"nll_reduction": "token", "nll_on_prompt": True}),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objectives_loss_is_a_sum_of_its_own_pairs_terms(name):
    cls, kwargs = OBJECTIVES[name]
    module = cls("unused-model-path", **kwargs)
    generator = torch.Generator().manual_seed(0)
    batch = {"chosen_score": torch.tensor([1.0, 0.2, -0.4]), "rejected_score": torch.tensor([0.1, 0.5, -1.0]),
             "ref_chosen_logps": torch.tensor([-12.0, -20.0, -5.0]), "ref_rejected_logps": torch.tensor([-14.0, -18.0, -6.0])}
    out = random_outputs(3, generator)
    terms = module.loss_terms(batch)
    loss, _ = module.objective(batch, out, "val")
    torch.testing.assert_close(terms(out).sum(), loss)
    # Another pair's outputs change; this pair's term does not (the fused head relies on it).
    moved = out._replace(**{field: value.clone() if torch.is_floating_point(value) else value
                            for field, value in out._asdict().items()})
    for value in moved:
        if torch.is_floating_point(value):
            value[1:] += 3.0 * torch.rand(2, generator=generator)
    first, changed = terms(out), terms(moved)
    assert first[0] == changed[0] and not torch.equal(first[1:], changed[1:])


def test_losses_over_the_whole_batch_are_not_split_into_pair_terms():
    assert EDPO("unused").loss_terms({}) is None  # the worst ensemble member's batch mean
    assert DRDO("unused", balance_terms=True).loss_terms({}) is None  # weights from gradient norms


@pytest.mark.parametrize("objective", ["drdo", "dpo", "orpo"])
def test_a_fused_training_step_equals_the_unfused_one(objective, tiny_model_dir, monkeypatch):
    import drdo_lightning.models as models

    module = {"drdo": lambda p: DRDO(p, preference_form="token_unlikelihood"), "dpo": DPO,
              "orpo": lambda p: ORPO(p, nll_on_prompt=True)}[objective](str(tiny_model_dir))
    module.hparams.chunked_head = True
    module.configure_model()
    vocab = module.policy.lm.config.vocab_size
    monkeypatch.setattr(models, "HEAD_CHUNK_ELEMENTS", 9 * vocab)  # 9 rows a chunk: a few chunks per batch
    ids, mask, labels = pair_rows(vocab, "left")
    batch = {"chosen_input_ids": ids[:2], "chosen_attention_mask": mask[:2], "chosen_labels": labels[:2],
             "rejected_input_ids": ids[2:], "rejected_attention_mask": mask[2:], "rejected_labels": labels[2:],
             "chosen_score": ORACLE[0], "rejected_score": ORACLE[1]}
    module.log = lambda *args, **kwargs: None  # no trainer to log to

    calls = []
    fused_head_loss = models.logprobs.fused_head_loss
    monkeypatch.setattr(models.logprobs, "fused_head_loss", lambda *args: calls.append(len(args[5])) or fused_head_loss(*args))

    def step(fused: bool):
        monkeypatch.setattr(type(module), "_step_fuses_head", lambda self, stage: fused)
        module.policy.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        return loss.detach()[None], {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}

    unfused = step(False)
    assert not calls
    assert_same(unfused, step(True), f"{objective} step", tolerance=1e-5)
    assert len(calls) == 1 and calls[0] > 1  # the fused head ran, over more than one chunk


def test_by_default_a_training_step_fuses_the_head_at_any_vocabulary(tiny_model_dir, monkeypatch):
    """``chunked_head: null``: below 100k tokens the head is chunked exactly where the step fuses it
    (measured never slower there); an objective whose loss is not a sum over pairs keeps the one-piece head."""
    import drdo_lightning.models as models

    calls = []
    fused_head_loss = models.logprobs.fused_head_loss
    monkeypatch.setattr(models.logprobs, "fused_head_loss", lambda *args: calls.append(1) or fused_head_loss(*args))
    chunked_calls = []
    chunked = models.logprobs.chunked_token_logps
    monkeypatch.setattr(models.logprobs, "chunked_token_logps", lambda *a, **k: chunked_calls.append(1) or chunked(*a, **k))
    ids, mask, labels = pair_rows(300, "right")
    batch = {"chosen_input_ids": ids[:2], "chosen_attention_mask": mask[:2], "chosen_labels": labels[:2],
             "rejected_input_ids": ids[2:], "rejected_attention_mask": mask[2:], "rejected_labels": labels[2:]}
    one_oracle = {"chosen_score": ORACLE[0], "rejected_score": ORACLE[1]}
    ensemble = {"chosen_score": torch.stack([ORACLE[0]] * 2, -1), "rejected_score": torch.stack([ORACLE[1]] * 2, -1)}
    for module, scores, fuses in ((DRDO(str(tiny_model_dir)), one_oracle, True), (EDPO(str(tiny_model_dir)), ensemble, False)):
        module.configure_model()
        module.log = lambda *args, **kwargs: None
        calls.clear()
        module.training_step({**batch, **scores}, 0).backward()
        assert bool(calls) is fuses, type(module).__name__
    assert not chunked_calls  # the unfused objective kept the one-piece head


def test_an_objective_that_disagrees_with_its_loss_terms_is_named_in_a_fused_step(tiny_model_dir):
    from drdo_lightning.errors import UserError

    class Regularised(DRDO):  # a user's subclass that adds a term to objective() and not to loss_terms()
        def objective(self, batch, out, stage):
            loss, metrics = super().objective(batch, out, stage)
            return loss + 1.0, metrics

    module = Regularised(str(tiny_model_dir))
    module.configure_model()
    module.log = lambda *args, **kwargs: None
    ids, mask, labels = pair_rows(300, "right")
    batch = {"chosen_input_ids": ids[:2], "chosen_attention_mask": mask[:2], "chosen_labels": labels[:2],
             "rejected_input_ids": ids[2:], "rejected_attention_mask": mask[2:], "rejected_labels": labels[2:],
             "chosen_score": ORACLE[0], "rejected_score": ORACLE[1]}
    with pytest.raises(UserError, match=r"Regularised.objective gives a loss of .* --model.chunked_head false"):
        module.training_step(batch, 0)
    module.hparams.chunked_head = False  # unfused, objective's loss is the loss
    assert module.training_step(batch, 0).isfinite()
