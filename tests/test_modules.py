"""The objectives' modules compute their loss with the public loss functions of drdo_lightning.losses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from drdo_lightning import DRDO, losses
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.pairs import TextPair
from drdo_lightning.data.tokenization import tokenize_pairs


def pair_batch(tokenizer, rows):
    pairs = [TextPair(r["prompt"], r["chosen"], r["rejected"], r["oracle_chosen"], r["oracle_rejected"], False)
             for r in rows]
    columns, _ = tokenize_pairs(pairs, tokenizer, max_prompt_length=32, max_length=96, drop_long=False)
    return PairCollator(tokenizer.pad_token_id)([dict(zip(columns, v)) for v in zip(*columns.values())])


@pytest.mark.parametrize("weights", [dict(alpha=0.3, gamma=1.0, distill_weight=0.5, detach_focal=True),
                                     dict(alpha=0.1, gamma=2.0, distill_weight=0.0, detach_focal=False),
                                     dict(alpha=0.1, gamma=2.0, distill_weight=1.0, preference_form="corrected"),
                                     dict(alpha=0.5, gamma=1.0, distill_weight=1.0, preference_form="token_unlikelihood",
                                          average_logps=True)])
def test_drdo_module_loss_is_the_public_drdo_terms_with_every_weight(tiny_model_dir, tiny_tokenizer, tiny_task, weights):
    batch = pair_batch(tiny_tokenizer, tiny_task["train"][:4])
    module = DRDO(str(tiny_model_dir), **weights)
    module.configure_model()
    out = module.forward_pairs(batch)
    assert (out.rejected_token_unlikelihood is not None) == (weights.get("preference_form") == "token_unlikelihood")
    loss, metrics = module.batch_loss(batch, out, "val")
    loss_weights = {k: v for k, v in weights.items() if k != "average_logps"}
    expected = losses.drdo_terms(out.chosen_logps, out.rejected_logps, out.chosen_rewards, out.rejected_rewards,
                                 batch["chosen_score"], batch["rejected_score"], **loss_weights,
                                 rejected_token_unlikelihood=out.rejected_token_unlikelihood).loss.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=0)
    weighted = weights["distill_weight"] * metrics["distillation"].mean() + metrics["preference"].mean()
    assert metrics["distillation"].mean().item() > 0 and weighted.item() == pytest.approx(loss.item(), rel=1e-6)


def backbone_grad_norm(module, term):
    params = [p for p in module.policy.lm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None])).item()


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_balanced_drdo_gives_both_terms_the_same_backbone_gradient_norm(tiny_model_dir, tiny_tokenizer, tiny_task, momentum):
    torch.manual_seed(0)  # the reward head's initialisation: the same whichever tests ran before
    module = DRDO(str(tiny_model_dir), balance_terms=True, balance_momentum=momentum)
    module.configure_model()
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=0.05)
    for step in range(3):
        batch = pair_batch(tiny_tokenizer, tiny_task["train"][4 * step:4 * step + 4])
        out = module.forward_pairs(batch)
        before = module.term_grad_norms.clone()
        loss, metrics = module.batch_loss(batch, out, "train")
        metrics = {name: value.mean() for name, value in metrics.items()}
        w_distill, w_preference = metrics["distill_balance_weight"], metrics["preference_balance_weight"]
        distill, preference = (backbone_grad_norm(module, metrics[t]) for t in ("distillation", "preference"))
        # The running means follow this step's norms (the first step sets them).
        measured = torch.tensor([distill, preference])
        want = measured if step == 0 else momentum * before + (1 - momentum) * measured
        torch.testing.assert_close(module.term_grad_norms, want, rtol=1e-4, atol=0)
        if momentum == 0.0:  # weighted by this step's norms, the terms pull the backbone equally hard
            assert (w_distill * distill) / (w_preference * preference) == pytest.approx(1.0, rel=1e-3)
        assert (w_distill + w_preference).item() == pytest.approx(2.0)
        assert loss.item() == pytest.approx((w_distill * metrics["distillation"] + w_preference * metrics["preference"]).item())
        if step == 0:  # unweighted, distillation dominates at the start
            assert distill > 3 * preference and w_preference > 1.5
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert module.state_dict()["term_grad_norms"].gt(0).all()


def test_balancing_is_off_by_default_and_needs_both_terms(tiny_model_dir):
    assert "term_grad_norms" not in dict(DRDO(str(tiny_model_dir)).named_buffers())
    with pytest.raises(ValueError, match="both terms"):
        DRDO(str(tiny_model_dir), balance_terms=True, alpha=0.0)
    with pytest.raises(ValueError, match="preference_form"):
        DRDO(str(tiny_model_dir), preference_form="ratio")


def test_balancing_refuses_sharded_parameters(tiny_model_dir):
    module = DRDO(str(tiny_model_dir), balance_terms=True)
    module.configure_model()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="32-true")
    with pytest.raises(ValueError, match="one device or with DDP"):
        module.on_fit_start()


def test_balanced_validation_uses_the_weights_training_set_and_logs_none(tiny_model_dir, tiny_tokenizer, tiny_task):
    module = DRDO(str(tiny_model_dir), balance_terms=True)
    module.configure_model()
    batch = pair_batch(tiny_tokenizer, tiny_task["train"][:4])
    with torch.no_grad():
        loss, metrics = module.batch_loss(batch, module.forward_pairs(batch), "val")
    assert "distill_balance_weight" not in metrics  # nothing measured yet: the terms unweighted
    assert loss.item() == pytest.approx((metrics["distillation"].mean() + metrics["preference"].mean()).item())
    module.term_grad_norms.copy_(torch.tensor([3.0, 1.0]))
    with torch.no_grad():
        loss, metrics = module.batch_loss(batch, module.forward_pairs(batch), "val")
    assert loss.item() == pytest.approx((0.5 * metrics["distillation"].mean() + 1.5 * metrics["preference"].mean()).item())


def test_metric_states_follow_the_strategy_device_at_fit_and_validation_start(tiny_model_dir):
    # DeepSpeed ZeRO-3 never moves the module as a whole, so on a GPU the correlation's states stayed on
    # the CPU and the first update failed (seen on an H200). "meta" stands in for the GPU here.
    for hook in ("on_fit_start", "on_validation_start"):
        module = DRDO(str(tiny_model_dir))
        module.configure_model()
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), precision="32-true")
        assert module.train_reward_corr.device == torch.device("cpu")
        getattr(module, hook)()
        assert module.train_reward_corr.device == module.val_reward_corr.device == torch.device("meta")
        assert next(module.policy.parameters()).device == torch.device("cpu")  # the parameters are DeepSpeed's to place
