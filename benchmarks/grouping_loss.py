"""Does length-grouped batching change the loss curve? A recipe trained with and without
``--data.group_by_length true`` over several seeds, and the mean curves side by side.

    python benchmarks/grouping_loss.py                          # DRDO on the embedded default, 3 seeds
    python benchmarks/grouping_loss.py --seeds 0 1 2 3 4 --recipe configs/dpo.yaml
    python benchmarks/grouping_loss.py --seeds 0 --max-steps 6 --val-batches 2   # smoke run

Each run is ``drdo_lightning.training.run_fit`` in this process (the recipe as ``python -m
drdo_lightning fit --config RECIPE`` trains it) with ``seed_everything`` and ``data.seed`` set to
the seed, in a temporary run folder. Grouping changes which pairs share a batch (pairs of similar
length), not which pairs an epoch sees, so in expectation over seeds the curves should agree;
the table shows, per validation check and for the training loss in bins of steps, the mean over
seeds of each setting and the mean paired difference (grouped - shuffled) with its standard error.
A difference within about two standard errors is noise at this number of seeds.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(log_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """``train/loss`` and ``val/loss`` by step from a CSVLogger's ``metrics.csv``."""
    train, val = {}, {}
    with (log_dir / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            for key, into in (("train/loss", train), ("val/loss", val)):
                if row.get(key):
                    into[int(row["step"])] = float(row[key])
    return train, val


def fit(recipe: str, seed: int, grouped: bool, args, run_dir: Path) -> tuple[dict[int, float], dict[int, float], float]:
    from drdo_lightning.training import run_fit

    overrides = {"seed_everything": seed, "data.seed": seed, "data.group_by_length": grouped,
                 "trainer.enable_progress_bar": False, "trainer.log_every_n_steps": args.log_every}
    if args.epochs is not None:
        overrides["trainer.max_epochs"] = args.epochs
    if args.max_steps is not None:
        overrides["trainer.max_steps"] = args.max_steps
    if args.val_batches is not None:
        overrides["trainer.limit_val_batches"] = args.val_batches
    result = run_fit(recipe, overrides, run_dir=run_dir)
    train, val = read_metrics(result.log_dir)
    return train, val, val[max(val)] if val else result.metrics.get("val/loss", math.nan)


def paired(grouped: list[float], shuffled: list[float]) -> str:
    """Means of both settings and the mean paired difference +- its standard error."""
    grouped, shuffled = zip(*[(g, s) for g, s in zip(grouped, shuffled) if math.isfinite(g) and math.isfinite(s)]
                            or [(math.nan, math.nan)])
    diffs = [g - s for g, s in zip(grouped, shuffled)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return (f"{statistics.mean(shuffled):.4f} | {statistics.mean(grouped):.4f} | "
            f"{statistics.mean(diffs):+.4f} +- {se:.4f}")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "drdo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the recipe's)")
    parser.add_argument("--max-steps", type=int, default=None, help="trainer.max_steps (smoke runs)")
    parser.add_argument("--val-batches", type=int, default=None, help="trainer.limit_val_batches (smoke runs)")
    parser.add_argument("--log-every", type=int, default=5, help="trainer.log_every_n_steps")
    parser.add_argument("--bins", type=int, default=8, help="bins of steps for the training-loss curve")
    args = parser.parse_args(argv)

    runs: dict[bool, list] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="drdo-grouping-") as tmp:
        for seed in args.seeds:
            for grouped in (False, True):
                runs[grouped].append(fit(args.recipe, seed, grouped, args, Path(tmp) / f"seed{seed}-{grouped}"))

    lines = [f"recipe {args.recipe}, seeds {args.seeds}: shuffled batches vs length-grouped "
             "(--data.group_by_length true); mean over seeds, paired difference grouped - shuffled +- standard error",
             "", "| curve | step | shuffled | grouped | difference |", "| --- | ---: | ---: | ---: | ---: |"]
    val_steps = sorted(set.intersection(*(set(v) for _, v, _ in runs[False] + runs[True])))
    for step in val_steps:
        lines.append(f"| val/loss | {step} | " + paired([v[step] for _, v, _ in runs[True]],
                                                         [v[step] for _, v, _ in runs[False]]) + " |")
    train_steps = sorted(set.intersection(*(set(t) for t, _, _ in runs[False] + runs[True])))
    if train_steps:
        size = max(1, math.ceil(len(train_steps) / args.bins))
        for i in range(0, len(train_steps), size):
            steps = train_steps[i:i + size]

            def binned(setting: bool) -> list[float]:
                return [statistics.mean(t[s] for s in steps) for t, _, _ in runs[setting]]

            lines.append(f"| train/loss (mean) | {steps[0]}-{steps[-1]} | {paired(binned(True), binned(False))} |")
    lines.append(f"| final val/loss | end | {paired([f for *_, f in runs[True]], [f for *_, f in runs[False]])} |")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


if __name__ == "__main__":
    main()
