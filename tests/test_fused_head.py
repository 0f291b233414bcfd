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

import drdo_lightning.heads as heads
from drdo_lightning import CDPO, DPO, DRDO, EDPO, IPO, ORPO, RDPO, RPO, SFT, Distill, OracleRewardModel, SimPO
from drdo_lightning.heads import Wanted, loss_and_sequence_values, sequence_values
from drdo_lightning.objectives import PairLoss, PairOutputs, PreferenceModule

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
    z, rewards, unlikelihood = values[:3]
    margin = torch.nn.functional.logsigmoid(0.01 * (z[:2] - z[2:]))
    return -margin + 0.1 * unlikelihood[2:] + 0.05 * z[:2] + (rewards[:2] - rewards[2:] - ORACLE[0]).square()


def loss_values_grads(model, side: str, chunk_rows: int | None, fused: bool, packed: bool = False):
    ids, mask, labels = pair_rows(VOCAB, side)
    model.zero_grad()
    fused = fused and loss_and_sequence_values(model, ids, mask, labels, pair_terms, Wanted(token_unlikelihood=True), groups=2,
                                               chunk_rows=chunk_rows, packed=packed)
    if fused:
        loss, values = fused
    else:  # unfused, or a head whose logits the model transforms: the (chunked) head's values
        values = sequence_values(model, ids, mask, labels, Wanted(token_unlikelihood=True), chunk_rows=chunk_rows, packed=packed)
        loss = pair_terms(values).sum()
    loss.backward()
    return (torch.cat([loss.detach()[None], *(v.detach() for v in values[:3])]),
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
        loss_and_sequence_values(model, ids, mask, labels, pair_terms, Wanted(token_unlikelihood=True), groups=2, chunk_rows=9)
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


def objective_batch() -> dict[str, torch.Tensor]:
    return {"chosen_score": torch.tensor([1.0, 0.2, -0.4]), "rejected_score": torch.tensor([0.1, 0.5, -1.0]),
            "ref_chosen_logps": torch.tensor([-12.0, -20.0, -5.0]), "ref_rejected_logps": torch.tensor([-14.0, -18.0, -6.0])}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objectives_loss_is_the_mean_of_its_own_pairs_losses(name):
    cls, kwargs = OBJECTIVES[name]
    module = cls("unused-model-path", **kwargs)
    generator = torch.Generator().manual_seed(0)
    batch, out = objective_batch(), random_outputs(3, generator)
    per_pair = module.pair_loss(batch, out)
    assert per_pair.loss.shape == (3,)
    loss, logged = module.batch_loss(batch, out, "val")  # the unfused step's loss
    torch.testing.assert_close(loss, per_pair.loss.mean())
    assert logged.keys() == per_pair.logged.keys()
    # Another pair's outputs change; this pair's loss does not (the fused head relies on it).
    moved = out._replace(**{field: value.clone() if torch.is_floating_point(value) else value
                            for field, value in out._asdict().items()})
    for value in moved:
        if torch.is_floating_point(value):
            value[1:] += 3.0 * torch.rand(2, generator=generator)
    first, changed = per_pair.loss, module.pair_loss(batch, moved).loss
    assert first[0] == changed[0] and not torch.equal(first[1:], changed[1:])


def objective_classes() -> list[type]:
    found, todo = [], [PreferenceModule]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [c for c in found if c.__module__.startswith("drdo_lightning.objectives.")]


def test_every_objective_defines_its_loss_in_one_place():
    """The loss has one definition: ``pair_loss``, from which the base builds the fused and the unfused
    step; an objective that overrides ``batch_loss`` says its loss is not a mean over pairs (never fused)
    where it does, and no class keeps a second definition under another name."""
    classes = objective_classes()
    assert {c.__name__ for c in classes} >= {"DRDO", "DPO", "EDPO", "SFT", "OracleRewardModel", "ORPO", "SimPO", "IPO"}
    for cls in classes:
        assert not {"objective", "loss_terms", "loss"} & set(vars(cls)), f"{cls.__name__} defines its loss under another name"
        if "batch_loss" in vars(cls) and cls is not PreferenceModule:
            assert "sums_over_pairs" in vars(cls), f"{cls.__name__}.batch_loss without saying whether its loss is a mean over pairs"
    assert not EDPO("unused").sums_over_pairs  # the worst ensemble member's batch mean
    assert not DRDO("unused", balance_terms=True).sums_over_pairs  # weights from gradient norms
    assert DRDO("unused").sums_over_pairs


def test_a_subclass_that_adds_a_term_to_its_loss_trains_on_it_fused_or_not(tiny_model_dir):
    """A user's subclass changes ``pair_loss`` alone, and both steps train on its loss."""

    class Regularised(DRDO):
        def pair_loss(self, batch, out):
            loss = super().pair_loss(batch, out)
            return PairLoss(loss.loss + 1.0, loss.logged)

    ids, mask, labels = pair_rows(300, "right")
    batch = {"chosen_input_ids": ids[:2], "chosen_attention_mask": mask[:2], "chosen_labels": labels[:2],
             "rejected_input_ids": ids[2:], "rejected_attention_mask": mask[2:], "rejected_labels": labels[2:],
             "chosen_score": ORACLE[0], "rejected_score": ORACLE[1]}
    losses = {}
    for cls in (DRDO, Regularised):
        for chunked in (None, False):
            module = cls(str(tiny_model_dir), chunked_head=chunked)
            torch.manual_seed(0)
            module.configure_model()
            module.log = lambda *args, **kwargs: None
            assert module.step_may_fuse("train") is (chunked is None)
            losses[cls, chunked] = module.training_step(batch, 0).item()
    for chunked in (None, False):
        assert losses[Regularised, chunked] == pytest.approx(losses[DRDO, chunked] + 1.0, abs=1e-5)
    assert losses[DRDO, None] == pytest.approx(losses[DRDO, False], abs=1e-5)


@pytest.mark.parametrize("objective", ["drdo", "dpo", "orpo"])
def test_a_fused_training_step_equals_the_unfused_one(objective, tiny_model_dir, monkeypatch):
    module = {"drdo": lambda p: DRDO(p, preference_form="token_unlikelihood"), "dpo": DPO,
              "orpo": lambda p: ORPO(p, nll_on_prompt=True)}[objective](str(tiny_model_dir))
    module.hparams.chunked_head = True
    module.configure_model()
    vocab = module.policy.lm.config.vocab_size
    monkeypatch.setattr(heads, "HEAD_CHUNK_ELEMENTS", 9 * vocab)  # 9 rows a chunk: a few chunks per batch
    ids, mask, labels = pair_rows(vocab, "left")
    batch = {"chosen_input_ids": ids[:2], "chosen_attention_mask": mask[:2], "chosen_labels": labels[:2],
             "rejected_input_ids": ids[2:], "rejected_attention_mask": mask[2:], "rejected_labels": labels[2:],
             "chosen_score": ORACLE[0], "rejected_score": ORACLE[1]}
    module.log = lambda *args, **kwargs: None  # no trainer to log to

    calls = []
    fused_head_loss = heads.logprobs.fused_head_loss
    monkeypatch.setattr(heads.logprobs, "fused_head_loss", lambda *args: calls.append(len(args[5])) or fused_head_loss(*args))

    def step(fused: bool):
        monkeypatch.setattr(type(module), "step_may_fuse", lambda self, stage: fused)
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
    calls = []
    fused_head_loss = heads.logprobs.fused_head_loss
    monkeypatch.setattr(heads.logprobs, "fused_head_loss", lambda *args: calls.append(1) or fused_head_loss(*args))
    chunked_calls = []
    chunked = heads.logprobs.chunked_token_logps
    monkeypatch.setattr(heads.logprobs, "chunked_token_logps", lambda *a, **k: chunked_calls.append(1) or chunked(*a, **k))
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
