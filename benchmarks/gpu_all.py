"""The GPU run in under 9 minutes: correctness on CUDA, then users' shapes against TRL, in one table.

    bash benchmarks/gpu_all.sh                # on a machine with one CUDA GPU
    bash benchmarks/gpu_all.sh --dry-run      # the same parts on CPU at a tiny size
    bash benchmarks/gpu_all.sh --parts checks llama3 vocab128k   # also an earlier part (see PARTS)

Parts, in this order, each a subprocess with its own time limit, cut to what is left of
``--budget`` seconds (a part that would get under a minute is skipped, a part that fails or times
out is reported and the next one runs). A dry run's limits are ``DRY_RUN_SLOWER`` times these. By default:

1. ``checks``: ``gpu_checks.py``, every correctness check with PASS/FAIL, its measured difference
   and tolerance (the fused head's step against the unfused one in fp32 and bf16 on five
   architectures, packed against padded log-probs, DRDO under DeepSpeed ZeRO-2 and ZeRO-3 on one
   GPU, the export reloaded by transformers alone). Cap 150 s.
2. ``llama3``: ``train_throughput.py --preset llama3-1b --checkpointing`` in bf16-mixed: a
   Llama-3.2-1B-shaped model (1.24B parameters, vocabulary 128,256), 8 pairs of 512 + 512 tokens,
   gradient checkpointing on both sides; TRL DPOTrainer (live reference) against DRDO, DPO with a
   precomputed and with a live reference, DRDO with the one-piece head (for the CUDA head's
   choice, ``heads.HEAD_DEFAULTS``) and TRL with its Liger option where ``liger-kernel`` installs;
   pairs/s, peak GPU memory, share of the bf16 matmul peak. One round, 2 warm-up steps, 3 windows
   of 3 steps; ``--time-limit`` 30 s under the cap, so rows that do not fit are listed as left out
   rather than losing the part. Cap 330 s.

Named in ``--parts``, the earlier parts also run: ``gpu124m`` (the OPT-125m-sized ``gpu`` preset),
``deepspeed`` (``gpu_deepspeed.py`` throughput), ``vocab128k`` (the small-body 128k preset, chunked
and one-piece heads) and ``real`` (long-tailed lengths, packed); with the default budget they do not
fit beside the two above.

Each configuration is a fresh process whose imports and model load take ~20-30 s on the lent
machine, so the steps are few: a first look, not quiet-machine figures. Never run by CI;
``--dry-run`` is what can be checked without a GPU (``tests/test_benchmark.py``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DEFAULT_PARTS = ("checks", "llama3")
BUDGET_S = 480.0  # the default parts' caps; with the wheels' install (about 30 s) the run stays under 9 minutes
# A dry run's time limits (budget, caps, the checks' fits, the benchmark's --time-limit) are this many times
# the GPU run's: tiny models on a CPU, maybe a shared one, take longer than the GPU's larger ones.
DRY_RUN_SLOWER = 4.0


class Part(NamedTuple):
    name: str
    command: list[str]
    cap_s: float
    out: Path  # the part's JSON


def parts(dry_run: bool, work: Path) -> dict[str, Part]:
    """Every part, by name, in run order."""
    py = sys.executable
    slower = DRY_RUN_SLOWER if dry_run else 1.0
    if dry_run:
        device = ["--device", "cpu", "--dtype", "fp32", "--threads", "1"]
        presets = {"gpu124m": "tiny", "vocab128k": "tiny", "llama3": "tiny"}
        steps = ["--rounds", "1", "--warmup-steps", "1", "--windows", "2", "--steps-per-window", "1"]
        large_vocabulary_steps = llama3_steps = steps
    else:
        device = ["--device", "cuda", "--dtype", "bf16"]
        presets = {"gpu124m": "gpu", "vocab128k": "vocab128k", "llama3": "llama3-1b"}
        steps = ["--rounds", "1", "--warmup-steps", "2", "--windows", "3", "--steps-per-window", "5"]
        large_vocabulary_steps = ["--rounds", "1", "--warmup-steps", "1", "--windows", "2", "--steps-per-window", "3"]
        llama3_steps = ["--rounds", "1", "--warmup-steps", "2", "--windows", "3", "--steps-per-window", "3"]
    benchmark = [py, str(BENCH / "train_throughput.py"), *device]
    out = {name: work / f"{name}.json" for name in ("checks", "llama3", "gpu124m", "deepspeed", "vocab128k", "real")}
    llama3_cap = 330.0 * slower
    listed = [
        Part("checks", [py, str(BENCH / "gpu_checks.py"), *(["--dry-run"] if dry_run else []),
                        "--fit-timeout", str(120.0 * slower), "--json", str(out["checks"])], 150.0 * slower, out["checks"]),
        Part("llama3", [*benchmark, "--preset", presets["llama3"], *llama3_steps, "--checkpointing",
                        "--only", "drdo", "dpo_precomputed", "dpo_live", "drdo_one_piece", "trl_dpo_liger",
                        "--time-limit", str(llama3_cap - 30 * slower), "--json", str(out["llama3"])], llama3_cap, out["llama3"]),
        Part("gpu124m", [*benchmark, "--preset", presets["gpu124m"], *steps, "--only", "drdo", "dpo_precomputed",
                         "--json", str(out["gpu124m"])], 100.0 * slower, out["gpu124m"]),
        Part("deepspeed", [py, str(BENCH / "gpu_deepspeed.py"), "--steps", "15", "--warmup", "5", "--batch-size", "16",
                           "--json", str(out["deepspeed"])], 140.0 * slower, out["deepspeed"]),
        Part("vocab128k", [*benchmark, "--preset", presets["vocab128k"], *large_vocabulary_steps,
                           "--only", "drdo", "drdo_one_piece", "--json", str(out["vocab128k"])], 100.0 * slower, out["vocab128k"]),
        Part("real", [*benchmark, "--preset", presets["gpu124m"], *steps, "--lengths", "real", "--packed",
                      "--only", "drdo", "--json", str(out["real"])], 160.0 * slower, out["real"]),
    ]
    return {part.name: part for part in listed}


def run_parts(listed: list[Part], budget: float) -> dict[str, str]:
    """Run each part within the budget; return each part's status ("ok", "failed ...", "skipped ...")."""
    deadline = time.monotonic() + budget
    status = {}
    for part in listed:
        left = deadline - time.monotonic()
        if left < 60:
            status[part.name] = f"skipped: {left:.0f} s of the budget left"
            continue
        limit = min(part.cap_s, left)
        print(f"== {part.name} (limit {limit:.0f} s): {' '.join(part.command[1:])}", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            done = subprocess.run(part.command, cwd=ROOT, timeout=limit, stdout=subprocess.PIPE, text=True)
            print(done.stdout, file=sys.stderr, flush=True)  # each part's own report, for the log
            status[part.name] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired as timeout:
            printed = timeout.stdout or b""  # what it printed before its limit (bytes, whatever text=True says)
            print(printed.decode(errors="replace") if isinstance(printed, bytes) else printed, file=sys.stderr, flush=True)
            status[part.name] = f"timed out after {limit:.0f} s"
        status[part.name] += f", {time.monotonic() - start:.0f} s"
    return status


def checks_summary(data: dict) -> list[str]:
    """One line per correctness check (FAIL first), after a count."""
    checks = data["checks"]
    counts = {s: sum(c["status"] == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    lines = [f"Correctness on {data['device']}: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items())]
    for c in sorted(checks, key=lambda c: c["status"] != "FAIL"):
        figures = "" if c["measured"] is None else f": {c['measured']:.3g} <= {c['tolerance']:.3g}"
        lines.append(f"- {c['status']} {c['name']}{figures}" + (f" ({c['detail']})" if c["detail"] else ""))
    return [*lines, ""]


def table(listed: list[Part], status: dict[str, str]) -> str:
    """The checks, then one markdown table of every throughput row, from the parts' JSON files."""
    head = []
    lines = ["| part | configuration | pairs/s | useful tokens/s | padding | peak memory MiB | pairs/s vs TRL "
             "| memory vs TRL | matmul TFLOP/s | % of peak |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for part in listed:
        name = part.name
        notes.append(f"{name}: {status.get(name, 'not run')}")
        if not part.out.exists():
            continue
        data = json.loads(part.out.read_text())
        if name == "checks":
            head = checks_summary(data)
            continue
        if name == "deepspeed":
            for preset, r in data["stages"].items():
                lines.append(f"| {name} | DRDO, {preset}, {r['world_size']} GPU(s), batch {data['batch_size']} | - | "
                             f"{r['tokens_per_s']:,.0f} | - | {r['peak_memory_gib'] * 1024:,.0f} | - | - | - | - |")
            continue
        sys.path.insert(0, str(BENCH))
        from train_throughput import ALL_CONFIGS

        peaks = data["matmul_peak_flops"]
        notes.append(f"{name}: preset {data['settings']['preset']}, checkpointing {data['settings']['checkpointing']}; "
                     "matmul peak " + ", ".join(f"{d} {v['peak'] / 1e12:.1f} TFLOP/s" for d, v in peaks.items())
                     + f"; % of peak against {data['settings']['dtype']}")
        notes += [f"{name}: left out {ALL_CONFIGS[n]}: {reason}" for n, reason in data.get("skipped", {}).items()]
        for r in data["rows"]:
            lines.append(f"| {name} | {ALL_CONFIGS[r['name']]} | {r['pairs_per_s']:.2f} | {r['useful_tokens_per_s']:,.0f} | "
                         f"{r['padding']:.1%} | {r['peak_mb']:,.0f} | {r['speedup']:.2f}x | {r['memory_ratio']:.2f}x | "
                         f"{r['tflops']:.2f} | {r['peak_fraction']:.1%} |")
    return "\n".join([*head, *lines, "", *notes])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same parts on CPU at a tiny size")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all parts together (default {BUDGET_S:.0f}, {DRY_RUN_SLOWER:.0f}x that in a dry run)")
    parser.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS),
                        choices=["checks", "llama3", "gpu124m", "deepspeed", "vocab128k", "real"],
                        help="which parts run (always in the listed order)")
    parser.add_argument("--keep", type=Path, default=None, help="copy every part's JSON into this folder")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --dry-run)")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="drdo-gpu-all-") as tmp:
        every = parts(args.dry_run, Path(tmp))
        # DeepSpeed's throughput benchmark needs CUDA; the checks part runs DeepSpeed on CPU in a dry run.
        listed = [p for name, p in every.items() if name in args.parts and not (args.dry_run and name == "deepspeed")]
        budget = args.budget if args.budget is not None else BUDGET_S * (DRY_RUN_SLOWER if args.dry_run else 1.0)
        status = run_parts(listed, budget)
        result = table(listed, status)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for part in listed:
                if part.out.exists():
                    (args.keep / part.out.name).write_text(part.out.read_text())
    print(result, flush=True)
    return result


if __name__ == "__main__":
    main()
