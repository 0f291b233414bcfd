"""The optimizer every objective trains with: AdamW, weight decay on matrices only, a cosine schedule
after a linear warm-up."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from transformers import get_cosine_schedule_with_warmup


def fused_adamw_allowed(device: torch.device, trainer: L.Trainer) -> bool:
    """Fused AdamW: one kernel over all tensors instead of a loop of small ops (7x less optimizer time
    on CPU; TRL's default too). Not under mixed precision (16 or bf16), where Lightning's AMP plugin
    refuses to clip the gradients of an optimizer that could unscale them itself, nor under DeepSpeed,
    whose engine wraps the optimizer."""
    return (
        device.type in ("cpu", "cuda")
        and not trainer.precision.endswith("-mixed")
        and not isinstance(trainer.strategy, DeepSpeedStrategy)
    )


def adamw_with_cosine_schedule(
    parameters: list[torch.nn.Parameter],
    matrices: frozenset[int],
    trainer: L.Trainer,
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    fused: bool,
) -> dict:
    """Lightning's ``configure_optimizers`` answer for the trainable ``parameters``: decay on those in
    ``matrices`` (ids), none on biases and norms; the schedule spans the run's optimizer steps."""
    decay, no_decay = [], []
    for param in parameters:
        if param.requires_grad:
            (decay if id(param) in matrices else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        # No empty group (LoRA without a reward head trains matrices only): DeepSpeed drops empty
        # groups, and the schedule, built on the groups given here, would no longer match.
        [group for group in groups if group["params"]],
        lr=learning_rate,
        betas=betas,
        fused=fused,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max(1, int(trainer.estimated_stepping_batches)))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
