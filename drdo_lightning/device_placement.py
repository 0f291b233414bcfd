"""Where a training module's pieces live, where a strategy or precision would put them wrong: the
reward head under "-true" precisions, and torchmetrics states under DeepSpeed ZeRO-3."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn
from torchmetrics import Metric


def keep_reward_head_fp32(head: nn.Module | None, trainer: L.Trainer) -> None:
    """"bf16-true" casts every parameter to bf16. The reward head is a few thousand numbers that
    regress real-valued targets, and bf16 would round its small updates away: keep it fp32 (the
    optimizer's state for it follows, as it is created at the first step). DeepSpeed keeps fp32
    master weights of its own and owns the parameters' storage."""
    if head is not None and trainer.precision.endswith("-true") and not isinstance(trainer.strategy, DeepSpeedStrategy):
        head.float()


def metrics_to_device(module: nn.Module, trainer: L.Trainer) -> None:
    """Put every torchmetrics state in ``module`` on the strategy's device. Under DeepSpeed ZeRO-3
    nothing moves the module as a whole (DeepSpeed places the partitioned parameters itself), so states
    built on the CPU would meet CUDA inputs at the first update."""
    device = trainer.strategy.root_device
    for sub in module.modules():
        if isinstance(sub, Metric) and sub.device != device:
            sub.to(device)
