"""The objectives' modules compute their loss with the public loss functions of drdo_lightning.losses."""

from __future__ import annotations

import pytest
import torch

from drdo_lightning import DRDO, losses
from drdo_lightning.data import PairCollator, TextPair, tokenize_pairs


@pytest.mark.parametrize("weights", [dict(alpha=0.3, gamma=1.0, distill_weight=0.5, detach_focal=True),
                                     dict(alpha=0.1, gamma=2.0, distill_weight=0.0, detach_focal=False)])
def test_drdo_module_loss_is_the_public_drdo_loss_with_every_weight(tiny_model_dir, tiny_tokenizer, tiny_task, weights):
    rows = tiny_task["train"][:4]
    pairs = [TextPair(r["prompt"], r["chosen"], r["rejected"], r["oracle_chosen"], r["oracle_rejected"], False)
             for r in rows]
    columns, _ = tokenize_pairs(pairs, tiny_tokenizer, max_prompt_length=32, max_length=96, drop_long=False)
    batch = PairCollator(tiny_tokenizer.pad_token_id)([dict(zip(columns, v)) for v in zip(*columns.values())])
    module = DRDO(str(tiny_model_dir), **weights)
    module.configure_model()
    out = module.forward_pairs(batch)
    loss, metrics = module.objective(batch, out, "val")
    expected = losses.drdo_loss(out.chosen_logps, out.rejected_logps, out.chosen_rewards, out.rejected_rewards,
                                batch["chosen_score"], batch["rejected_score"], **weights).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    weighted = weights["distill_weight"] * metrics["distillation"] + metrics["preference"]
    assert metrics["distillation"].item() > 0 and weighted.item() == pytest.approx(loss.item(), rel=1e-6)
