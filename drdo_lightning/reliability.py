"""Reliability for long runs: atomic checkpoints, a checkpoint on SIGTERM, non-finite steps skipped.

The CLI turns all three on (see :mod:`drdo_lightning.cli`); in your own scripts pass them to the
Trainer: ``Trainer(plugins=[AtomicCheckpointIO()], callbacks=[CheckpointOnSigterm(), NonFiniteGuard()])``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from drdo_lightning.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read: truncated, corrupt, or holding objects we refuse to unpickle.

    A :class:`~drdo_lightning.errors.UserError`: the command line prints it as one line.
    """


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def unreadable_checkpoint(path, error: Exception) -> CheckpointError:
    """The error for a checkpoint that ``torch.load(weights_only=True)`` could not read."""
    if "weights_only" in str(error) or "Weights only load failed" in str(error):
        return CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, which would run code "
            f"while unpickling ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Only resume from checkpoints you trust."
        )
    return CheckpointError(
        f"{path}: not a readable checkpoint, probably truncated or corrupt ({type(error).__name__}: {error}). "
        + earlier_checkpoint_advice(Path(path))
    )


def earlier_checkpoint_advice(path: Path) -> str:
    """Which checkpoint to resume from instead of ``path``: the newest other one beside it, by name."""
    others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime, reverse=True)
    if not others:
        return f"No other checkpoint in {path.parent}: start again, or resume from a copy you trust."
    return f"Resume from an earlier one: --ckpt_path {others[0]} (the newest of {len(others)} beside it)."


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file beside the target, then renamed over it.

    A run killed while saving leaves the previous checkpoint intact (``os.replace`` is atomic on
    one filesystem) and at most a hidden ``.<name>.<pid>.tmp`` file. Lightning's own writer goes
    through fsspec, whose temporary file lives in ``/tmp``: across filesystems its final "move"
    is a copy that can be cut short under the final name.

    Loading uses ``torch.load(weights_only=True)`` unless a caller explicitly asks otherwise (torch
    before 2.6 defaults to full unpickling), and turns an unreadable file into a
    :class:`CheckpointError` that names it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: leave it to fsspec
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the name points at it
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only is not False)
        except Exception as e:
            raise unreadable_checkpoint(path, e) from e


class CheckpointOnSigterm(L.Callback):
    """Save a checkpoint (and ``last.ckpt``) when the run receives SIGTERM, then exit with status 143.

    Schedulers send SIGTERM before preempting a job. Lightning's signal connector notes it,
    finishes the current batch and raises ``SIGTERMException``; this callback then turns on
    ``save_on_exception`` for the run's ``ModelCheckpoint`` callbacks, which Lightning calls after
    it (checkpoint callbacks always run last), so they write a step checkpoint and ``last.ckpt``.
    Resume with ``--ckpt_path last``. The exit status becomes 143 (128 + SIGTERM), so a scheduler
    does not take the interrupted run for a finished one (Lightning's default is 0).
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = 143
        savers = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        for cb in savers:
            cb.save_on_exception = True
        if not savers:
            rank_zero_warn("received SIGTERM, but the run has no ModelCheckpoint callback: nothing was saved")


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

    A skipped step leaves the weights and the optimizer's moments untouched: every gradient is
    set to ``None``, which makes AdamW pass over the parameters entirely (zeroed gradients would
    still apply weight decay and advance Adam's step count). Lightning still counts the step,
    so ``global_step`` and a per-step learning-rate schedule advance, as with a step skipped by
    mixed-precision loss scaling. Each one is logged (a warning naming the step and what was not
    finite) and counted: ``train/nonfinite_steps`` is the total so far.

    Under DeepSpeed the engine owns the (sharded) gradients: the guard sees the loss only and
    cannot skip the step, but still counts it and stops the run.

    Args:
        max_consecutive: Stop the run (raise :class:`NonFiniteError`) when this many optimizer
            steps in a row are non-finite. ``0`` never stops.
    """

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = 0  # non-finite steps so far (saved in checkpoints)
        self.consecutive = 0
        self._losses: list[Tensor] = []  # of every micro-batch since the last optimizer step
        self._stepped = False  # an optimizer step ran in this batch
        self._bad: str | None = None  # what was not finite in that step and what was done, if anything

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.total, self.consecutive = state_dict["total"], state_dict["consecutive"]

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        losses, self._losses = self._losses, []
        grads = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        checks = [torch.isfinite(x).all() for x in losses] + [g.isfinite().all() for _, g in grads]
        finite = not checks or bool(torch.stack(checks).all())  # one device sync per step
        self._stepped, self._bad = True, None
        # Ranks must agree: a non-finite loss on one rank skips the step on all of them.
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        # A non-finite loss makes every gradient non-finite: name parameters only when the loss was fine.
        if not all(torch.isfinite(x).all() for x in losses):
            self._bad = f"loss {[x.item() for x in losses]}"
        elif names := [n for n, g in grads if not g.isfinite().all()]:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self._bad = f"gradients of {len(names)} parameter(s): {shown}"
        else:
            self._bad = "loss or gradients on another rank"
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            self._bad = f"(not skipped: the DeepSpeed engine owns the gradients): non-finite {self._bad}"
        else:
            for p in pl_module.parameters():
                p.grad = None  # AdamW passes over parameters without a gradient: no update, no weight decay
            self._bad = f"(skipped): non-finite {self._bad}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._stepped:
            return  # gradient accumulation: no optimizer step after this micro-batch
        self._stepped = False
        if self._bad is None:
            self.consecutive = 0
        else:
            self.total += 1
            self.consecutive += 1
            metrics = sorted(
                k for k, v in trainer.callback_metrics.items() if k.startswith("train/") and not torch.isfinite(v).all()
            )
            # global_step already counts this step, skipped or not.
            message = f"step {trainer.global_step - 1} {self._bad}"
            if metrics:
                message += f"; non-finite metrics: {', '.join(metrics)}"
            if self.max_consecutive and self.consecutive >= self.max_consecutive:
                raise NonFiniteError(
                    f"{self.consecutive} optimizer steps in a row were non-finite (--non_finite.max_consecutive "
                    f"{self.max_consecutive}); the last: {message}. Lower the learning rate, check the data "
                    "(e.g. the score columns) or train in a wider dtype."
                )
            if trainer.is_global_zero:
                log.warning("%s (%d non-finite steps so far)", message, self.total)
        pl_module.log("train/nonfinite_steps", float(self.total), on_step=True, on_epoch=False)


def warn_if_resume_repeats_an_epoch(trainer: L.Trainer) -> None:
    """Warn at the start of training when Lightning will not resume this run exactly.

    Lightning 2.6 restarts a max_steps-bounded run from a checkpoint written as an epoch ended
    (ModelCheckpoint's per-epoch saving) by ending that epoch a second time: the epoch count runs one
    ahead, so the sampler draws the following epoch's order and max_epochs comes early."""
    if trainer.fit_loop.restarted_on_epoch_end and trainer.max_steps != -1:
        rank_zero_warn(
            f"resuming with --trainer.max_steps {trainer.max_steps} from a checkpoint written as epoch "
            f"{trainer.current_epoch} ended: Lightning counts that epoch twice, so this run goes on with the "
            "data order of the epoch after next and reaches max_epochs one epoch early; it will not match an "
            "uninterrupted run. Runs bounded by max_epochs alone, and checkpoints saved by step "
            "(ModelCheckpoint every_n_train_steps), resume exactly."
        )
