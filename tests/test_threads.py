"""How torch's OpenMP threads wait (``drdo_lightning/threads.py``): a finite ``GOMP_SPINCOUNT``, set
before torch loads, only where the user chose nothing and did not opt out. No timings here;
``benchmarks/shared_machine.py`` measures them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from drdo_lightning import free_cores as free_cores_module
from drdo_lightning import threads

ROOT = Path(__file__).resolve().parents[1]
CLEARED = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "DRDO_THREADS")

# Notes GOMP_SPINCOUNT at the moment torch is first imported: what libgomp reads when it loads.
PROBE = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
sys.meta_path.insert(0, Spy())
import drdo_lightning
print(seen[0], os.environ.get("GOMP_SPINCOUNT"))
"""


def probe(**user: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED} | user
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_importing_the_package_sets_the_spin_count_before_torch_loads():
    assert probe() == [str(threads.SPIN_COUNT)] * 2


@pytest.mark.parametrize("user", [{"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"DRDO_THREADS": "off"}])
def test_the_users_choice_and_the_opt_out_are_left_alone(user):
    expected = user.get("GOMP_SPINCOUNT", "None")
    assert probe(**user) == [expected, expected]


@pytest.fixture
def torch_not_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)


@pytest.mark.usefixtures("torch_not_loaded")
@pytest.mark.parametrize("user, why", [
    ({}, None),
    ({"OMP_NUM_THREADS": "1"}, None),  # the number of threads is the user's; how they wait is not
    ({"GOMP_SPINCOUNT": "0"}, "GOMP_SPINCOUNT set by the user"),
    ({"OMP_WAIT_POLICY": "active"}, "OMP_WAIT_POLICY set by the user"),
    ({"DRDO_THREADS": "off"}, "DRDO_THREADS=off"),
    ({"DRDO_THREADS": "OFF", "GOMP_SPINCOUNT": "7"}, "DRDO_THREADS=off"),
])
def test_configure(user, why):
    environ = dict(user)
    assert threads.configure(environ) == why
    assert environ == (user | {"GOMP_SPINCOUNT": str(threads.SPIN_COUNT)} if why is None else user)


def test_configure_does_nothing_once_torch_is_loaded():
    import torch  # noqa: F401  (already loaded by the package here)

    environ: dict[str, str] = {}
    assert "torch was imported" in threads.configure(environ)
    assert environ == {}


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
    before = free_cores_module.Sample(machine_busy=100.0, own=10.0, wall=0.0)
    after = free_cores_module.Sample(machine_busy=103.0, own=11.0, wall=2.0)  # others: 2 s of CPU in 2 s
    assert free_cores_module.free_cores(before, after, cores=2) == pytest.approx(1.0)
    assert free_cores_module.free_cores(before, before, cores=4) == 4.0
    assert [free_cores_module.threads_for(f, most=2) for f in (-0.5, 0.4, 1.4, 1.6, 3.0)] == [1, 1, 1, 2, 2]


def test_sample_reads_the_busy_fields_of_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy
    stat.write_text(f"cpu  {ticks} {ticks} {ticks} {50 * ticks} {7 * ticks} {ticks} {ticks} {ticks} 0 0\ncpu0 1 2 3\n")
    assert free_cores_module.sample(stat).machine_busy == pytest.approx(6.0)
    assert free_cores_module.sample(tmp_path / "missing") is None


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
        return free_cores_module.Sample(clock["busy"], own=0.0, wall=clock["wall"])

    monkeypatch.setattr(free_cores_module, "sample", fake_sample)
    monkeypatch.setattr(free_cores_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(free_cores_module.os, "cpu_count", lambda: 2)
    try:
        callback = free_cores_module.FollowFreeCores(every_n_steps=5)
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
        assert not free_cores_module.FollowFreeCores().enabled
    finally:
        torch.set_num_threads(started)
