"""Waiting for child processes by their progress, not by the clock.

A slow, loaded or fresh machine (DeepSpeed compiling its ops on first use) may take many minutes;
a hung run (a collective waiting on a rank that died) makes no progress at all. So a wait fails
only after ``IDLE_LIMIT`` seconds in which the processes and everything they started used no CPU
time and wrote nothing to the watched files.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

IDLE_LIMIT = 300.0  # seconds without CPU time or output before a run counts as hung
POLL = 1.0


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants (0 where ``/proc`` is unreadable)."""
    total, todo = 0.0, [pid]
    ticks = os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        try:
            # Fields after the command name (which may hold spaces, hence the split at ")").
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile, or not Linux
    return total


def progress(procs: list[subprocess.Popen], outputs: list[Path]) -> tuple[float, int]:
    return (sum(tree_cpu_seconds(p.pid) for p in procs),
            sum(path.stat().st_size for path in outputs if path.exists()))


def wait(procs: list[subprocess.Popen], outputs: list[Path] = (), until=None, idle_limit: float = IDLE_LIMIT) -> None:
    """Wait until every process has exited (or ``until()`` is true); kill them all and fail if none
    of them made progress for ``idle_limit`` seconds."""
    outputs = list(outputs)
    last, changed = None, time.monotonic()
    while any(p.poll() is None for p in procs) and not (until is not None and until()):
        now = progress(procs, outputs)
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed > idle_limit:
            for p in procs:
                p.kill()
                p.wait()
            pytest.fail(f"no progress (CPU time or output) for {idle_limit:.0f} s: the run is taken for hung")
        time.sleep(POLL)


def run(args: list, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)``, waited for by :func:`wait`: a slow
    run passes, a hung one fails after ``IDLE_LIMIT`` seconds without progress."""
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True)
            wait([proc], [out, err])
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())
