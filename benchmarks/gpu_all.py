"""Every GPU benchmark in one run of under 10 minutes, and one table (start it with ``gpu_all.sh``).

    bash benchmarks/gpu_all.sh                # on a machine with one CUDA GPU
    bash benchmarks/gpu_all.sh --dry-run      # CPU smoke of the same parts: tiny preset, no DeepSpeed

Parts, in this order, each a subprocess with its own time limit, cut to what is left of
``--budget`` seconds (a part that would get under a minute is skipped, a part that fails or times
out is reported and the next one runs):

1. ``train_throughput.py --preset gpu --device cuda --dtype bf16`` with fixed lengths: TRL DPO
   against DRDO and our DPO with a precomputed reference, with the bf16 (and fp32) matmul peak as
   the anchor; one round, 2 warm-up steps and 3 windows of 5 steps per configuration.
2. ``gpu_deepspeed.py``: DRDO under DeepSpeed ZeRO-2 and ZeRO-3 with bf16-mixed, 5 warm-up + 15
   steps each.
3. ``train_throughput.py --preset vocab128k``: TRL DPO against DRDO with the chunked LM head (the
   default from 100k tokens) and with the head in one piece, bf16; 2 windows of 3 steps.
4. ``train_throughput.py --lengths real --packed``: TRL DPO and DRDO on long-tailed lengths,
   padded, length-grouped, packed, and grouped + packed.

Each configuration is a fresh process whose imports and model set-up take ~20-30 s on the lent
machine, so the steps are few: these are a first look, not the quiet-machine figures. Never run
by CI; ``--dry-run`` is what can be checked without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def parts(dry_run: bool, work: Path) -> list[tuple[str, list[str], float, Path]]:
    """(name, command, time cap in s, JSON output) of every part."""
    py = sys.executable
    if dry_run:
        device, presets = ["--device", "cpu", "--dtype", "fp32", "--threads", "1"], {"gpu": "tiny", "vocab128k": "tiny"}
        steps = ["--rounds", "1", "--warmup-steps", "1", "--windows", "2", "--steps-per-window", "1"]
        large_vocabulary_steps = steps
    else:
        device, presets = ["--device", "cuda", "--dtype", "bf16"], {"gpu": "gpu", "vocab128k": "vocab128k"}
        steps = ["--rounds", "1", "--warmup-steps", "2", "--windows", "3", "--steps-per-window", "5"]
        large_vocabulary_steps = ["--rounds", "1", "--warmup-steps", "1", "--windows", "2", "--steps-per-window", "3"]
    benchmark = [py, str(BENCH / "train_throughput.py"), *device]
    throughput = [*benchmark, "--preset", presets["gpu"], *steps]
    vocab = [*benchmark, "--preset", presets["vocab128k"], *large_vocabulary_steps]
    out = {name: work / f"{name}.json" for name in ("fixed", "deepspeed", "vocab128k", "real")}
    listed = [
        ("fixed", [*throughput, "--only", "drdo", "dpo_precomputed", "--json", str(out["fixed"])], 100.0, out["fixed"]),
        ("deepspeed", [py, str(BENCH / "gpu_deepspeed.py"), "--steps", "15", "--warmup", "5", "--batch-size", "16",
                       "--json", str(out["deepspeed"])], 140.0, out["deepspeed"]),
        ("vocab128k", [*vocab, "--only", "drdo", "drdo_one_piece", "--json", str(out["vocab128k"])], 100.0,
         out["vocab128k"]),
        ("real", [*throughput, "--lengths", "real", "--packed", "--only", "drdo", "--json", str(out["real"])], 160.0,
         out["real"]),
    ]
    return [p for p in listed if not (dry_run and p[0] == "deepspeed")]  # DeepSpeed's benchmark needs CUDA


def run_parts(listed, budget: float) -> dict[str, str]:
    """Run each part within the budget; return each part's status ("ok", "failed ...", "skipped ...")."""
    deadline = time.monotonic() + budget
    status = {}
    for name, command, cap, _ in listed:
        left = deadline - time.monotonic()
        if left < 60:
            status[name] = f"skipped: {left:.0f} s of the budget left"
            continue
        limit = min(cap, left)
        print(f"== {name} (limit {limit:.0f} s): {' '.join(command[1:])}", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, timeout=limit, stdout=subprocess.PIPE, text=True)
            print(done.stdout, file=sys.stderr, flush=True)  # each part's own report, for the log
            status[name] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status[name] = f"timed out after {limit:.0f} s"
        status[name] += f", {time.monotonic() - start:.0f} s"
    return status


def table(listed, status: dict[str, str]) -> str:
    """One markdown table of every part's rows, from their JSON files."""
    lines = ["| part | configuration | pairs/s | useful tokens/s | padding | peak memory MiB | pairs/s vs TRL "
             "| memory vs TRL | matmul TFLOP/s | % of peak |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for name, _, _, out in listed:
        notes.append(f"{name}: {status.get(name, 'not run')}")
        if not out.exists():
            continue
        data = json.loads(out.read_text())
        if name == "deepspeed":
            for preset, r in data["stages"].items():
                lines.append(f"| {name} | DRDO, {preset}, {r['world_size']} GPU(s), batch {data['batch_size']} | - | "
                             f"{r['tokens_per_s']:,.0f} | - | {r['peak_memory_gib'] * 1024:,.0f} | - | - | - | - |")
            continue
        sys.path.insert(0, str(BENCH))
        from train_throughput import ALL_CONFIGS

        peaks = data["matmul_peak_flops"]
        notes.append(f"{name}: matmul peak " + ", ".join(f"{d} {v['peak'] / 1e12:.1f} TFLOP/s" for d, v in peaks.items())
                     + f"; % of peak against {data['settings']['dtype']}")
        for r in data["rows"]:
            lines.append(f"| {name} | {ALL_CONFIGS[r['name']]} | {r['pairs_per_s']:.2f} | {r['useful_tokens_per_s']:,.0f} | "
                         f"{r['padding']:.1%} | {r['peak_mb']:,.0f} | {r['speedup']:.2f}x | {r['memory_ratio']:.2f}x | "
                         f"{r['tflops']:.2f} | {r['peak_fraction']:.1%} |")
    return "\n".join([*lines, "", *notes])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke: tiny preset, fp32, no DeepSpeed")
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for all parts together")
    parser.add_argument("--keep", type=Path, default=None, help="copy every part's JSON into this folder")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --dry-run)")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="drdo-gpu-all-") as tmp:
        listed = parts(args.dry_run, Path(tmp))
        status = run_parts(listed, args.budget)
        result = table(listed, status)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for _, _, _, out in listed:
                if out.exists():
                    (args.keep / out.name).write_text(out.read_text())
    print(result, flush=True)
    return result


if __name__ == "__main__":
    main()
