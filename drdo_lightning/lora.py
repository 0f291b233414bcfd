"""LoRA adapters (``peft``) on the policy's language model, for every objective.

``--model.lora '{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}'`` trains low-rank
adapters instead of the LM's weights; the LM's own weights stay frozen, and the reward head (a
separate ``hidden -> 1`` layer beside the LM) stays fully trainable. Only the adapters and the head
get gradients and optimizer state, which is what lets a 7B model train on one GPU.

Reference-based objectives (DPO, IPO, distillation, e-DPO) need the starting policy as their
reference. With adapters that is the policy itself with its adapters switched off
(:func:`adapters_disabled`): no second copy of the weights, as in TRL.

``peft`` is an optional dependency (``pip install -e ".[peft]"``); it is imported only when an
adapter is asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

# Short names the ``lora`` option accepts beside LoraConfig's own field names.
_SHORT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
_ADAPTER_KEY = ".lora_"  # peft names every adapter tensor lora_A/lora_B/lora_magnitude_vector...
_WRAPPED_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped LM


def lora_config(spec: Mapping[str, Any]):
    """A ``peft.LoraConfig`` from the ``lora`` option.

    Keys are LoraConfig's fields (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
    ``use_dora``, ...) or the short ``alpha`` and ``dropout``. Unset keys default to ``r=16``,
    ``alpha=32``, ``dropout=0`` on every linear layer but the LM head (``all-linear``).
    """
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError('LoRA needs peft: pip install -e ".[peft]"') from e
    fields = {_SHORT_NAMES.get(key, key): value for key, value in spec.items()}
    return LoraConfig(task_type="CAUSAL_LM", **{**_DEFAULTS, **fields})


def add_adapters(lm: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """``lm`` wrapped in a ``peft.PeftModel`` with freshly initialised adapters; its own weights frozen.

    The adapters start as the identity (LoRA's ``B = 0``), so the wrapped LM computes what ``lm`` did.
    """
    from peft import get_peft_model

    with _whole_tensors():
        return get_peft_model(lm, lora_config(spec))


@contextmanager
def _whole_tensors() -> Iterator[None]:
    """Create parameters as whole tensors, also inside DeepSpeed's ``zero.Init`` (ZeRO-3).

    There a new parameter is partitioned as soon as its module exists, and peft's initialisation
    of the adapters (``B = 0``) would write into an empty shard and be lost. Whole, the adapters
    start as on one process; the engine partitions them when it starts.
    """
    if "deepspeed" not in sys.modules:  # no DeepSpeed in use, so no zero.Init either
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def has_adapters(lm: nn.Module) -> bool:
    """Whether ``lm`` is a ``peft`` model (without importing peft when it is not installed)."""
    return type(lm).__module__.startswith("peft.")


def backbone(lm: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft`` wrapper (``lm`` itself when it has no adapters)."""
    return lm.get_base_model() if has_adapters(lm) else lm


@contextmanager
def adapters_disabled(policy: nn.Module) -> Iterator[nn.Module]:
    """``policy`` as its base model: the LM's adapters switched off and in eval mode (no dropout).

    This is the reference of reference-based objectives with adapters: the starting weights,
    which the adapters leave untouched.
    """
    training = policy.training
    policy.eval()
    try:
        with policy.lm.disable_adapter():
            yield policy
    finally:
        policy.train(training)


def base_weights(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The base model's entries of a LoRA policy's state dict, under the plain policy's keys.

    ``lm.base_model.model.<name>.base_layer.weight`` becomes ``lm.<name>.weight``; adapter tensors
    are dropped. What the LM was before adapters were added, so it can be built and then wrapped.
    """
    return {
        key.replace(f"lm.{_WRAPPED_PREFIX}", "lm.", 1).replace(".base_layer.", "."): value
        for key, value in state_dict.items()
        if _ADAPTER_KEY not in key
    }


def merged(policy: nn.Module) -> nn.Module:
    """``policy`` with its adapters folded into the LM's weights: a plain transformers LM again.

    Changes ``policy`` in place (peft's ``merge_and_unload``); the reward head is kept.
    """
    policy.lm = policy.lm.merge_and_unload()
    return policy
