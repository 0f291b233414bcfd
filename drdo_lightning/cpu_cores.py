"""The cores other processes leave free: measured from ``/proc/stat``, and followed while training runs.

A parallel region of torch's CPU kernels ends at a barrier that waits for its slowest thread. When
another process holds a core, the thread on that core runs a time slice at a time and every
barrier waits for it; on 2 cores next to two busy processes the DRDO job on the embedded default
ran 12x slower than alone (docs/performance.md, "Shared machines"). With one thread per free
core there is nobody to wait for. :class:`FollowFreeCores` measures, from ``/proc/stat``, how much
CPU time the rest of the machine used since it last looked, and sets ``torch.set_num_threads`` to
the cores left (never more than the count the run started with, never fewer than one).

It acts on CPU runs on Linux only (elsewhere, or on an accelerator, it does nothing) and reads two
small files every ``every_n_steps`` optimizer steps.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
OFF_VALUES = ("off", "0", "false", "no")  # of DRDO_THREADS
# /proc/stat fields of the "cpu" line that count as busy (user, nice, system, irq, softirq, steal);
# idle and iowait do not.
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class Sample:
    """Machine-wide busy CPU seconds, this process's CPU seconds, and the wall clock, at one moment."""

    machine_busy: float
    own: float
    wall: float


def sample(stat: Path = PROC_STAT) -> Sample | None:
    """A :class:`Sample` now, or None where ``/proc/stat`` cannot be read."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields)) / ticks
    times = os.times()
    return Sample(busy, times.user + times.system, time.monotonic())


def free_cores(before: Sample, after: Sample, cores: int) -> float:
    """Cores the rest of the machine left idle between two samples: ``cores`` minus the others' CPU
    seconds per second (the machine's busy time less this process's)."""
    elapsed = after.wall - before.wall
    if elapsed <= 0:
        return float(cores)
    others = max(0.0, (after.machine_busy - before.machine_busy) - (after.own - before.own)) / elapsed
    return cores - others


def usable_cores() -> int:
    """Cores this process may run on (``sched_getaffinity`` is Linux-only; elsewhere all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_cores_now(interval: float = 0.2) -> int:
    """Cores this process may use that the rest of the machine left idle over the next ``interval``
    seconds (all usable ones where ``/proc/stat`` cannot be read), at least one."""
    usable = usable_cores()
    before = sample()
    if before is None:
        return usable
    time.sleep(interval)
    return threads_for(min(usable, free_cores(before, sample(), os.cpu_count() or 1)), usable)


def threads_for(free: float, most: int) -> int:
    """Threads to run with: the free cores, rounded to the nearest whole core, within [1, ``most``]."""
    return max(1, min(most, int(free + 0.5)))


class FollowFreeCores(L.Callback):
    """Every ``every_n_steps`` optimizer steps, set torch's thread count to the cores left free.

    Args:
        every_n_steps: How often to look, in optimizer steps (the first look is when training starts).
        enabled: ``False`` keeps the thread count the run started with; so does ``DRDO_THREADS=off``
            in the environment.
    """

    def __init__(self, every_n_steps: int = 10, enabled: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.enabled = enabled and os.environ.get("DRDO_THREADS", "").strip().lower() not in OFF_VALUES
        self._most = 0
        self._last: Sample | None = None
        self._looked_at_step = -1

    def _active(self, trainer: L.Trainer) -> bool:
        return self.enabled and trainer.strategy.root_device.type == "cpu" and self._last is not None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._most = torch.get_num_threads()
        self._last = sample()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The first look covers the set-up since fit started (this process's own work is subtracted).
        if self._active(trainer) and self._most > 1:
            self._follow()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step
        if self._active(trainer) and self._most > 1 and step % self.every_n_steps == 0 and step != self._looked_at_step:
            self._looked_at_step = step  # once per optimizer step, also under gradient accumulation
            self._follow()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._most:
            torch.set_num_threads(self._most)  # what the rest of the program started with

    def _follow(self) -> None:
        now = sample()
        if now is None:
            return
        free = free_cores(self._last, now, os.cpu_count() or 1)
        threads = threads_for(free, self._most)
        self._last = now
        if threads != torch.get_num_threads():
            log.info("other processes leave %.1f of %d cores free: training on %d threads", free, os.cpu_count(), threads)
            torch.set_num_threads(threads)
