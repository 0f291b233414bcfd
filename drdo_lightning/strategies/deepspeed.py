"""DeepSpeed ZeRO-2/3 for every recipe, on CUDA GPUs and on CPU-only machines.

:class:`DeepSpeedStrategy` is Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`
with three additions, so that the presets in ``configs/strategies/`` run unchanged on GPUs, in
tests, in CI and on CPU clusters:

- CPU support (gloo backend): Lightning's strategy refuses anything but CUDA, though DeepSpeed
  itself trains on CPU.
- ZeRO-3 with Hugging Face models: the module builds its model in ``configure_model``, which
  Lightning runs inside ``deepspeed.zero.Init``; transformers is told, so that ``from_pretrained``
  creates every parameter partitioned and copies the checkpoint into the partitions.
- ZeRO-Offload of the optimizer: the module's AdamW becomes DeepSpeed's CPU Adam, which
  DeepSpeed requires there.

Use it from YAML::

    trainer:
      strategy:
        class_path: drdo_lightning.strategies.DeepSpeedStrategy
        init_args: {stage: 3}
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies.deepspeed import remove_module_hooks
from torch.nn import Module
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers.integrations import HfDeepSpeedConfig


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, also on CPU (``--trainer.accelerator cpu``, gloo backend).

    On CPU it skips the two checks that assume CUDA devices and gives DeepSpeed each process's
    local rank as its device rank, because CPU devices carry no index. Takes every argument of
    Lightning's ``DeepSpeedStrategy`` (``stage``, ``offload_optimizer``, ``offload_parameters``,
    ``config``, ...).
    """

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @property
    def _device_rank(self) -> int | None:
        # DeepSpeed places the engine on `device_rank`; on CPU every rank's device is "cpu".
        return self.local_rank if self._on_cpu else self.root_device.index

    def setup_environment(self) -> None:
        if not self._on_cpu:
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # everything but the parent's "CUDA only" check

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        # The parent's steps without `_validate_device_index_selection`: it expects the device
        # indices 0..n-1 of GPUs, and CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        """Lightning's ``deepspeed.zero.Init`` around ``configure_model``, made known to transformers.

        Under ZeRO-3 ``from_pretrained`` must create the model already partitioned and copy the
        checkpoint into the partitions; it does so only when a live ``HfDeepSpeedConfig`` says
        ZeRO-3 is on (otherwise it initialises and loads into empty shards and fails). The object
        is kept for the strategy's lifetime: transformers consults it again, e.g. in ``generate``.
        """
        with super().model_sharded_context():
            if self.zero_stage_3:
                self._hf_deepspeed_config = HfDeepSpeedConfig(self.config)
            yield

    @property
    def _offloads_optimizer(self) -> bool:
        offload = self.config.get("zero_optimization", {}).get("offload_optimizer") or {}
        return offload.get("device", "none") != "none"

    def _setup_model_and_optimizer(self, model: Module, optimizer: Optimizer | None, lr_scheduler=None):
        """``deepspeed.initialize`` for training, as Lightning calls it but with ``_device_rank``.

        With the optimizer offloaded to the CPU, the module's ``torch.optim.AdamW`` becomes
        :func:`cpu_adamw`, the same update that DeepSpeed requires there.
        """
        if self._offloads_optimizer and isinstance(optimizer, torch.optim.AdamW):
            optimizer = cpu_adamw(optimizer, lr_scheduler)
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        """``validate``/``test``/``predict``: as Lightning's, but with ``_device_rank``."""
        config = {"train_micro_batch_size_per_gpu": 1}  # DeepSpeed's throughput timers require it
        config.update({k: self.config[k] for k in ("fp16", "bf16") if k in self.config})
        if self.zero_stage_3:
            config.update({k: self.config[k] for k in ("zero_allow_untested_optimizer", "zero_optimization")})
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank),
            config=config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )


def cpu_adamw(optimizer: torch.optim.AdamW, lr_scheduler: LRScheduler | None = None) -> Optimizer:
    """DeepSpeed's ``DeepSpeedCPUAdam`` in AdamW mode, with ``optimizer``'s parameter groups.

    ZeRO-Offload steps the optimizer on the CPU copy of the weights and insists on DeepSpeed's
    vectorised CPU Adam there (several times faster than torch's); it is a C++ op that DeepSpeed
    compiles on first use (about a minute; needs a C++ compiler and ``ninja``). Every group keeps
    its learning rate, betas, eps and weight decay; ``lr_scheduler`` is pointed at the new
    optimizer so the schedule still drives the one that steps.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cpu_adam = DeepSpeedCPUAdam(optimizer.param_groups, adamw_mode=True)
    if lr_scheduler is not None:
        lr_scheduler.optimizer = cpu_adam
    return cpu_adam


# The C++ ops DeepSpeed builds on first use here: its Adam for offloaded optimizer states, and
# (on CPU) its shared-memory collectives.
OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def extensions_dir() -> Path:
    """Where torch builds and caches C++ ops: ``$TORCH_EXTENSIONS_DIR``, else its default root."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def leftover_build_locks(root: Path) -> list[Path]:
    """The ``lock`` files of op builds under ``root``.

    torch marks a build in progress with a ``lock`` file and makes every other process wait, with
    no timeout, until it is gone; a build that was killed leaves it behind and every later run
    waits forever without a word. Outside a running build, any such file is a leftover.
    """
    return sorted(root.glob("**/lock")) if root.is_dir() else []


def build_ops() -> list[str]:
    """Build (or find in torch's extension cache, :func:`extensions_dir`) the ops of :data:`OPS`
    that this machine's accelerator has; return their names.

    DeepSpeed compiles them the first time a run needs them, for a minute or more without a word;
    building them once ahead (``make setup`` runs ``python -m drdo_lightning.strategies.deepspeed``,
    with the cache inside the virtual environment) takes that wait out of the first run.
    """
    from deepspeed.accelerator import get_accelerator

    for lock in leftover_build_locks(extensions_dir()):
        print(
            f"DeepSpeed: {lock} is the lock of a build of {lock.parent.name}; torch waits until it is "
            "gone. If no other build is running, it was left by a killed one: delete it.",
            flush=True,
        )
    built = []
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load()
            built.append(name)
    return built


if __name__ == "__main__":
    print(
        f"DeepSpeed: building its ops once in {extensions_dir()} (a minute or more the first time; cached afterwards) ...",
        flush=True,
    )
    print("DeepSpeed: ready:", ", ".join(build_ops()) or "no op to build on this machine")
