"""How loading preference data scales: time, peak memory and cores against the row count.

For each size, writes seeded synthetic JSONL pairs shaped like Ultrafeedback's (prompts of 10-120
words, responses of 20-300 words) and runs ``PreferenceDataModule.prepare_data()`` (read,
validate, tokenize, write the cache) in a fresh subprocess, then prints one table row:

    rows | seconds | rows/s | peak RSS main (MB) | peak RSS worker (MB) | peak PSS total (MB) | processes | cores busy

``peak RSS main`` is the subprocess's own high-water resident set (``ru_maxrss``); ``peak RSS
worker`` the largest of its tokenizing workers' (0 when it tokenizes in-process); ``peak PSS total``
the largest sum, sampled every 50 ms, of the proportional set size of the subprocess and all its
workers (shared pages counted once, so it is what the whole load costs the machine);
``processes`` how many processes tokenized (from the module's log); ``cores busy`` CPU seconds
of the subprocess and its workers over wall seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py                     # 15000 60000 240000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py --sizes 2000 8000   # smoke

The code measured is whichever ``drdo_lightning`` the interpreter imports (``PYTHONPATH``), so an
older checkout can be measured the same way; it is given ``num_proc`` only if it takes one.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = ROOT / "embedded_default" / "base_model"


def _vocabulary(rng: random.Random, size: int = 5000) -> list[str]:
    """Pseudo-words of 1-4 syllables: English-like lengths, so tokens per word look like real text's."""
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ea", "ou")]
    return ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(size)]


def write_pairs(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` JSONL preference pairs: prompts of 10-120 words, responses of 20-300 words (seeded)."""
    rng = random.Random(seed)
    words = _vocabulary(rng)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high))).capitalize() + "."

    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            row = {"prompt": text(10, 120), "chosen": " " + text(20, 300), "rejected": " " + text(20, 300)}
            f.write(json.dumps(row) + "\n")
    return path


def _tree_pss_kb(root: int) -> int:
    """Summed PSS (kB) of ``root`` and its descendants, read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def child(args: argparse.Namespace) -> None:
    """One measured run in this (fresh) process; prints its figures as one JSON line."""
    from drdo_lightning.data.datamodule import PreferenceDataModule

    processes: list[int] = []

    class ProcessCount(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("tokenizing %d %s pairs in %d process"):
                processes.append(record.args[2])

    data_log = logging.getLogger("drdo_lightning.data")
    data_log.setLevel(logging.INFO)
    data_log.addHandler(ProcessCount())

    peak_pss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss
        while not done.wait(0.05):
            peak_pss = max(peak_pss, _tree_pss_kb(os.getpid()))

    kwargs = dict(train_file=args.child, tokenizer=args.tokenizer, cache_dir=args.cache_dir,
                  max_prompt_length=args.max_prompt_length, max_length=args.max_length)
    if "num_proc" in inspect.signature(PreferenceDataModule).parameters:
        kwargs["num_proc"] = args.num_proc
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, cpu_start = time.perf_counter(), os.times()
    dm = PreferenceDataModule(**kwargs)
    dm.prepare_data()
    seconds, cpu_end = time.perf_counter() - start, os.times()
    done.set()
    sampler.join()
    cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])  # user + system, own and waited-for workers'
    print(json.dumps({
        "seconds": seconds,
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "pss_total_mb": peak_pss / 1024,
        "processes": max(processes) if processes else None,
        "cores_busy": cpu / seconds,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[15000, 60000, 240000])
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--num-proc", type=int, default=None, help="the data module's num_proc (default: free cores)")
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="where the JSONL and caches go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="data_scale-", dir=args.workdir) as work:
        work = Path(work)
        header = ("rows", "seconds", "rows/s", "peak RSS main (MB)", "peak RSS worker (MB)", "peak PSS total (MB)",
                  "processes", "cores busy")
        print(f"# {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; load average {os.getloadavg()[0]:.2f}")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        results = []
        for rows in args.sizes:
            data = write_pairs(work / f"pairs_{rows}.jsonl", rows, args.seed)
            command = [sys.executable, __file__, "--child", str(data), "--cache-dir", str(work / f"cache_{rows}"),
                       "--tokenizer", args.tokenizer, "--max-prompt-length", str(args.max_prompt_length),
                       "--max-length", str(args.max_length)]
            if args.num_proc is not None:
                command += ["--num-proc", str(args.num_proc)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = {"rows": rows, **json.loads(out.strip().splitlines()[-1])}
            results.append(result)
            print(f"| {rows} | {result['seconds']:.1f} | {rows / result['seconds']:.0f} | {result['rss_main_mb']:.0f} | "
                  f"{result['rss_worker_mb']:.0f} | {result['pss_total_mb']:.0f} | {result['processes'] or '-'} | "
                  f"{result['cores_busy']:.2f} |", flush=True)
            data.unlink()
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
