"""FollowFreeCores: torch's thread count follows the cores other processes leave free (no timings
here; ``benchmarks/shared_machine.py`` measures them), and that benchmark's settings and targets."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from drdo_lightning import cpu_cores

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmarks_settings_and_targets():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import shared_machine as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert bench.setting_env("default") == {}
    assert bench.setting_env("off") == {"DRDO_THREADS": "off"}
    assert bench.setting_env("spin=1000") == {"GOMP_SPINCOUNT": "1000"}
    assert bench.setting_env("threads=1") == {"OMP_NUM_THREADS": "1"}
    assert bench.setting_env("A=1,B=2") == {"A": "1", "B": "2"}
    with pytest.raises(SystemExit):
        bench.setting_env("fast")
    args = bench.parse_args([])
    times = {("default", 0): [17.0], ("default", 1): [30.0], ("default", 2): [45.0], ("off", 0): [16.0]}
    table, ok = bench.report(times, {key: [0.1] for key in times}, args)
    assert "1 busy: 1.88x <= 1.6x: MISSED" in table and "2 busy: 2.81x" in table and not ok


# ---------------------------------------------------------------------------------------
# FollowFreeCores: the thread count follows the cores other processes leave free


def test_free_cores_subtracts_this_process_from_the_machine_busy_time():
    before = cpu_cores.Sample(machine_busy=100.0, own=10.0, wall=0.0)
    after = cpu_cores.Sample(machine_busy=103.0, own=11.0, wall=2.0)  # others: 2 s of CPU in 2 s
    assert cpu_cores.free_cores(before, after, cores=2) == pytest.approx(1.0)
    assert cpu_cores.free_cores(before, before, cores=4) == 4.0
    assert [cpu_cores.threads_for(f, most=2) for f in (-0.5, 0.4, 1.4, 1.6, 3.0)] == [1, 1, 1, 2, 2]


def test_sample_reads_the_busy_fields_of_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy
    stat.write_text(f"cpu  {ticks} {ticks} {ticks} {50 * ticks} {7 * ticks} {ticks} {ticks} {ticks} 0 0\ncpu0 1 2 3\n")
    assert cpu_cores.sample(stat).machine_busy == pytest.approx(6.0)
    assert cpu_cores.sample(tmp_path / "missing") is None


def _cpu_trainer(step: int = 0):
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), global_step=step)


def test_follow_free_cores_drops_to_the_free_cores_and_restores_at_the_end(monkeypatch):
    started = torch.get_num_threads()
    torch.set_num_threads(2)
    others = iter([0.0, 1.8, 1.8, 0.1])  # CPU seconds the rest of the machine used per second, per look
    clock = {"busy": 0.0, "wall": 0.0}

    def fake_sample():
        clock["wall"] += 1.0
        clock["busy"] += next(others)
        return cpu_cores.Sample(clock["busy"], own=0.0, wall=clock["wall"])

    monkeypatch.setattr(cpu_cores, "sample", fake_sample)
    monkeypatch.setattr(cpu_cores.os, "cpu_count", lambda: 2)
    try:
        callback = cpu_cores.FollowFreeCores(every_n_steps=5)
        callback.on_fit_start(_cpu_trainer(), None)
        callback.on_train_start(_cpu_trainer(), None)  # the first look: 1.8 cores busy elsewhere
        assert torch.get_num_threads() == 1
        callback.on_train_batch_end(_cpu_trainer(step=3))  # not a step to look at
        assert torch.get_num_threads() == 1
        callback.on_train_batch_end(_cpu_trainer(step=5))  # still busy
        assert torch.get_num_threads() == 1
        callback.on_train_batch_end(_cpu_trainer(step=10))  # the others went quiet: both cores again
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        callback.on_train_end(_cpu_trainer(), None)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("DRDO_THREADS", "off")
        assert not cpu_cores.FollowFreeCores().enabled
    finally:
        torch.set_num_threads(started)
