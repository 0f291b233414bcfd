"""Building the policy a training module trains: dropout, gradient checkpointing, LoRA adapters,
and which of its parameters are matrices (the ones AdamW decays)."""

from __future__ import annotations

from typing import Any

import torch

from drdo_lightning import lora
from drdo_lightning.models import CausalLMWithRewardHead, remove_dropout


def build_policy(
    model: str,
    *,
    reward_head: bool,
    reward_head_seed: int | None = None,
    trust_remote_code: bool = False,
    disable_dropout: bool = True,
    gradient_checkpointing: bool = False,
    lora_config: dict[str, Any] | None = None,
) -> CausalLMWithRewardHead:
    """The policy in train mode, loaded from ``model`` with a reward head where asked (a new one is
    initialised from ``reward_head_seed`` when the directory has none)."""
    # A forked RNG seeds the head alone and leaves the global streams (data order) as they were.
    with torch.random.fork_rng(enabled=reward_head_seed is not None):
        if reward_head_seed is not None:
            torch.manual_seed(reward_head_seed)
        policy = CausalLMWithRewardHead.from_pretrained(
            model, reward_head=reward_head, trust_remote_code=trust_remote_code
        ).train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
    if disable_dropout:
        remove_dropout(policy)
    if gradient_checkpointing:
        policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_config is not None:  # after remove_dropout: the adapters' dropout is as asked
        policy.lm = lora.add_adapters(policy.lm, lora_config)
    return policy


def matrix_ids(policy: torch.nn.Module) -> frozenset[int]:
    """Ids of the parameters that are matrices (the ones weight decay applies to). Told apart when the
    policy is built, by shape: FSDP later flattens every parameter into a 1-D shard (ZeRO-3 already
    has, but keeps the real shape in ``ds_shape``)."""
    return frozenset(id(p) for p in policy.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2)
