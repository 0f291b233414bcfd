"""Wall time of the main training job on a quiet machine and next to busy processes, per thread setting.

    python benchmarks/shared_machine.py                                  # default, off, passive; 0/1/2 busy; 2 repeats
    python benchmarks/shared_machine.py --settings default off --repeats 3 --wait-for-load 0.3
    python benchmarks/shared_machine.py --settings off spin=10000 threads=1 --busy 0 2 --steps 30

The job is ``python -m drdo_lightning fit --config configs/drdo.yaml --trainer.max_steps STEPS
--trainer.limit_val_batches 0`` (its logs and checkpoint go to a temporary directory), timed
from start to exit, start-up included. A *busy* process is a single-thread CPU-bound Python loop,
started before the job and killed after it: what another user's script does to a shared machine.

Settings (each one environment for the job):

- ``default``: nothing set; the package's own choice applies (``drdo_lightning/cpu_cores.py``:
  training follows the cores other processes leave free).
- ``off``: ``DRDO_THREADS=off``: the old behaviour, a fixed thread count and libgomp's defaults (threads spin 300,000 times
  before they sleep).
- ``active`` / ``passive``: ``OMP_WAIT_POLICY=ACTIVE`` / ``PASSIVE``.
- ``spin=N``: ``GOMP_SPINCOUNT=N``; ``threads=N``: ``OMP_NUM_THREADS=N``.
- ``NAME=VALUE[,NAME=VALUE...]``: any environment variables.

Every cell is repeated ``--repeats`` times, in rounds that rotate through the settings so that slow
drifts of the machine hit every setting alike. The table gives the min and median wall time and the
median's ratio to the quiet median of ``--baseline`` (``off``), then checks the targets of the
default setting: quiet within 5% of the baseline's quiet time, next to 1 busy process at most 1.6x,
next to 2 at most 2.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import loadavg, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while True: pass"
# The targets, as ratios of the default setting's median to the baseline's quiet median, by busy count.
TARGETS = {0: 1.05, 1: 1.6, 2: 2.5}
NAMED = {
    "default": {},
    "off": {"DRDO_THREADS": "off"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
# Variables a setting may pin; the others are cleared so that the caller's environment doesn't leak in.
THREAD_VARIABLES = ("DRDO_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def setting_env(setting: str) -> dict[str, str]:
    """The environment variables one setting names."""
    if setting in NAMED:
        return dict(NAMED[setting])
    if setting.startswith("spin="):
        return {"GOMP_SPINCOUNT": setting.split("=", 1)[1]}
    if setting.startswith("threads="):
        return {"OMP_NUM_THREADS": setting.split("=", 1)[1]}
    if "=" in setting:
        return dict(pair.split("=", 1) for pair in setting.split(","))
    raise SystemExit(f"unknown setting {setting!r}: use default, off, active, passive, spin=N, threads=N or NAME=VALUE")


def job_command(steps: int, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "drdo_lightning", "fit", "--config", "configs/drdo.yaml",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(workdir)]


def run_job(setting: str, busy: int, steps: int, workdir: Path) -> float:
    """Seconds one job takes with ``busy`` busy processes beside it."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(setting_env(setting))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    job = None
    try:
        time.sleep(0.5 if busy else 0.0)  # let them get going
        start = time.perf_counter()
        job = subprocess.Popen(job_command(steps, workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        _, stderr = job.communicate()
        seconds = time.perf_counter() - start
    finally:
        for process in [*hogs, job]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    if job.returncode != 0:
        raise RuntimeError(f"{setting} with {busy} busy failed (exit {job.returncode}):\n{stderr[-4000:]}")
    return seconds


def report(times: dict[tuple[str, int], list[float]], loads: dict[tuple[str, int], list[float]], args
           ) -> tuple[str, bool]:
    """The table and the targets' checks; ``loads`` are the 1-minute load averages after each run."""
    base = statistics.median(times[(args.baseline, 0)]) if (args.baseline, 0) in times else None
    lines = [f"| setting | busy | min (s) | median (s) | median vs {args.baseline} quiet | load after (median) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for (setting, busy), values in times.items():
        ratio = f"{statistics.median(values) / base:.2f}x" if base else "-"
        lines.append(f"| {setting} | {busy} | {min(values):.1f} | {statistics.median(values):.1f} | {ratio} "
                     f"| {statistics.median(loads[(setting, busy)]):.2f} |")
    ok = True
    checked = args.settings[0] if "default" not in args.settings else "default"
    for busy, bound in TARGETS.items():
        if base is None or (checked, busy) not in times:
            continue
        ratio = statistics.median(times[(checked, busy)]) / base
        met = ratio <= bound
        ok &= met
        lines.append(f"target {checked}, {busy} busy: {ratio:.2f}x <= {bound}x: {'met' if met else 'MISSED'}")
    return "\n".join(lines), ok


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["default", "off", "passive"],
                        help="default, off, active, passive, spin=N, threads=N, NAME=VALUE[,NAME=VALUE]")
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2], help="numbers of busy processes")
    parser.add_argument("--steps", type=int, default=60, help="--trainer.max_steps of the job")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default="off", help="the setting whose quiet median the ratios divide by")
    parser.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                        help="first wait (up to --wait-timeout s) until the 1-minute load average is below LOAD")
    parser.add_argument("--wait-timeout", type=float, default=2400.0)
    parser.add_argument("--json", type=Path, default=None, help="also write every time here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> bool:
    args = parse_args(argv)
    # A terminated benchmark leaves no job or busy process behind (run_job's cleanup runs on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = list(dict.fromkeys([*args.settings, args.baseline]))
    for setting in settings:
        setting_env(setting)  # fail early on a typo
    if args.wait_for_load is not None:
        wait_for_quiet(args.wait_for_load, args.wait_timeout)
    load_start = loadavg()
    times: dict[tuple[str, int], list[float]] = {(s, b): [] for s in settings for b in args.busy}
    loads: dict[tuple[str, int], list[float]] = {key: [] for key in times}
    with tempfile.TemporaryDirectory(prefix="drdo-shared-") as tmp:
        for r in range(args.repeats):
            order = settings[r % len(settings):] + settings[:r % len(settings)]
            for busy in args.busy:
                for setting in order:
                    seconds = run_job(setting, busy, args.steps, Path(tmp))
                    times[(setting, busy)].append(seconds)
                    loads[(setting, busy)].append(load := loadavg())
                    print(f"round {r + 1}: {setting}, {busy} busy: {seconds:.1f} s (load {load:.2f})",
                          file=sys.stderr, flush=True)
    table, ok = report(times, loads, args)
    print(f"{os.cpu_count()} CPUs; {args.steps} steps; {args.repeats} repeats; "
          f"1-minute load average {load_start:.2f} at the start, {loadavg():.2f} at the end")
    print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)},
                                         "times": [[s, b, t, loads[(s, b)]] for (s, b), t in times.items()]},
                                        indent=1, default=str))
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
