"""Test-only pieces that tests name on the command line like any other class.

In-process runs find them because pytest puts ``tests/`` on ``sys.path``; the multi-process
tests put ``tests/`` on ``PYTHONPATH`` of their ``python -m drdo_lightning fit`` subprocesses:
``--trainer.callbacks+=probes.MeanLossOverRanks``, ``--model probes.ShardProbeDRDO``.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch

from drdo_lightning import DRDO


class MeanLossOverRanks(L.Callback):
    """Log ``probe/loss``: each step's training loss averaged over all ranks.

    The modules log rank 0's own loss at each step (no per-step sync); the mean over ranks is
    the loss of the whole global batch, which is what a single process with that batch sees.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach()
        pl_module.log("probe/loss", loss, on_step=True, on_epoch=False, sync_dist=True, batch_size=1)


class StopAfterSteps(L.Callback):
    """End ``fit`` once ``steps`` optimizer steps are done, like a job cut off by its time limit.

    ``max_steps`` (and so the learning-rate schedule) stays as configured, so a resumed run
    must continue exactly as the uninterrupted one.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class StepLosses(L.Callback):
    """Append ``<global step> <training loss>`` to ``path`` after every optimizer step.

    Written line by line, so a killed run leaves every step it finished; ``repr`` of the float
    reads back bitwise.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step} {outputs['loss'].item()!r}\n")


class SigkillAtStep(L.Callback):
    """Kill this process with SIGKILL once ``step`` optimizer steps are done, as a lost machine would:
    no handler runs and nothing more is saved. Checkpoint callbacks run after this one, so a step
    checkpoint due at ``step`` is not written either."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class ShardProbeDRDO(DRDO):
    """DRDO that records, right after ``configure_model``, what this rank holds of each parameter.

    Writes ``<probe_dir>/rank<R>.json``: ``{name: [full numel, local shard numel, numel of the
    tensor as seen]}``. Under ZeRO-3 the parameters come out of ``configure_model`` already
    partitioned: the tensor as seen is empty and the shard is about ``1 / world_size`` of it.
    """

    def __init__(self, *args, probe_dir: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probe_dir = Path(probe_dir)

    def configure_model(self) -> None:
        super().configure_model()
        record = {
            name: [getattr(p, "ds_numel", p.numel()), p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel(), p.numel()]
            for name, p in self.policy.named_parameters()
        }
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        (self.probe_dir / f"rank{rank}.json").write_text(json.dumps(record))


class OutputDtype(L.Callback):
    """Write ``<path>.rank<R>`` with the dtype of the output projection's result at the first training step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            def record(module, inputs, output):
                Path(f"{self.path}.rank{trainer.global_rank}").write_text(str(output.dtype))
            self.handle = pl_module.policy.lm.get_output_embeddings().register_forward_hook(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.handle.remove()
