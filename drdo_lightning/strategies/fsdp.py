"""PyTorch FSDP for every recipe: Lightning's strategy, sharding each transformer block.

:class:`FSDPStrategy` is Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` whose
default wrap policy needs no class names: every block a Hugging Face model declares as
``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...) becomes its own FSDP
unit, so only one block's full weights are gathered at a time, whichever architecture the recipe
trains. The policy is built when the model exists (Lightning wraps it after ``configure_model``).

Use it from YAML (``configs/strategies/fsdp.yaml``)::

    trainer:
      strategy:
        class_path: drdo_lightning.strategies.FSDPStrategy
        init_args: {sharding_strategy: FULL_SHARD, state_dict_type: sharded}

It runs on CUDA GPUs (NCCL) and on CPU processes (gloo). A sharded checkpoint is a directory
(``torch.distributed.checkpoint``); :func:`read_sharded_checkpoint` reads it without a process
group, for ``export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch import Tensor
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn import Module
from transformers import PreTrainedModel

METADATA_FILE = "meta.pt"  # Lightning's file beside the shards: everything but weights and optimizer states


def transformer_blocks(model: Module) -> set[type[Module]]:
    """Classes of the blocks every Hugging Face model inside ``model`` names in ``_no_split_modules``."""
    names = {name for m in model.modules() if isinstance(m, PreTrainedModel) for name in m._no_split_modules or ()}
    return {type(m) for m in model.modules() if type(m).__name__ in names}


class NormClippingFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin with ``gradient_clip_val`` (clipping by norm), as the recipes use.

    Each rank holds a shard of every gradient, so the norm to clip by is a sum over ranks: FSDP's
    ``clip_grad_norm_`` on the root module computes it, which Lightning's plugin cannot reach.
    """

    root: Module | None = None  # the FSDP-wrapped module; set by FSDPStrategy when it wraps
    device_type = "cuda"  # where the forward runs; set by FSDPStrategy when it wraps

    def clip_grad_by_norm(self, optimizer, clip_val: float) -> None:
        self.root.clip_grad_norm_(clip_val)

    def forward_context(self):
        # Lightning's plugin autocasts for CUDA only, so on CPU "bf16-mixed" would compute in fp32.
        if "mixed" in self.precision:
            return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16)
        return super().forward_context()


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDP strategy, also on CPU; without an ``auto_wrap_policy`` each transformer block is one unit.

    Takes every argument of Lightning's ``FSDPStrategy`` (``sharding_strategy``,
    ``state_dict_type``, ``cpu_offload``, ``activation_checkpointing_policy``, ...). Gradients
    are clipped by their global norm (``gradient_clip_val``), which Lightning's FSDP refuses.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Applied in _setup_model, where the model and so its block classes exist.
        self._wrap_policy = self.kwargs.pop("auto_wrap_policy", None)

    def _setup_model(self, model: Module) -> Module:
        """Wrap ``model`` in FSDP here, then leave the rest of the set-up to Lightning.

        Lightning's own wrapping names the device by its index, which CPU devices lack, and FSDP
        then refuses the CPU; here it gets the device itself.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            device = self.root_device
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=device if device.type == "cpu" else device.index,
                auto_wrap_policy=self._wrap_policy or ModuleWrapPolicy(transformer_blocks(model)),
                **self.kwargs,
            )
        self.precision_plugin.root = model
        self.precision_plugin.device_type = self.root_device.type
        return super()._setup_model(model)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole module's state dict, gathered on rank 0's CPU (empty on the other ranks).

        Collective: every rank must call it. Unit by unit, so no device holds the whole model.
        """
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        # Offloading to the CPU from the CPU crashes torch's FSDP (freed memory read in its clone).
        config = FullStateDictConfig(offload_to_cpu=self.root_device.type != "cpu", rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()

    @property
    def precision_plugin(self) -> NormClippingFSDPPrecision:
        return LightningFSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin: FSDPPrecision | None) -> None:
        # None until the Trainer hands over the plugin of its --trainer.precision (a default set
        # here would be taken for the user's choice and override it).
        if type(plugin) is FSDPPrecision:
            plugin = NormClippingFSDPPrecision(plugin.precision, plugin.scaler)
        LightningFSDPStrategy.precision_plugin.fset(self, plugin)


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is the directory FSDP writes with ``state_dict_type: sharded``."""
    return path.is_dir() and (path / METADATA_FILE).is_file() and (path / ".metadata").is_file()


def read_sharded_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The module's full state dict and Lightning's other entries, from FSDP's sharded checkpoint.

    Reads on one process, without a process group, only the weights (not the optimizer states):
    every shard of every tensor is read into one full tensor on the CPU.
    """
    # torch's planner for reading a checkpoint without the model it came from (as its dcp_to_torch_save does).
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    reader, planner = FileSystemReader(path), _EmptyStateDictLoadPlanner(keys={"model"})
    _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    rest = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=True)
    return state["model"], rest
