"""The multi-process tests wait for progress, not for a clock (:mod:`progress`)."""

from __future__ import annotations

import subprocess
import sys

import progress
import pytest


def test_a_run_that_makes_no_progress_is_stopped_and_fails():
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(pytest.fail.Exception, match="no progress"):
        progress.wait([idle], idle_limit=2)
    assert idle.poll() is not None  # killed


def test_a_busy_run_outlives_the_idle_limit():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 4\nwhile time.time() < end: pass"])
    progress.wait([busy], idle_limit=2)  # 4 s of work, never 2 s without CPU time
    assert busy.returncode == 0


def test_cpu_time_counts_the_children_too():
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               "'import time\\nend = time.time() + 2\\nwhile time.time() < end: pass'])"])
    progress.wait([parent], idle_limit=1.5)  # the parent itself only waits: its child's CPU time is the progress
    assert parent.returncode == 0
