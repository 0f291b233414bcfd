"""What an online training step costs: sampling and scoring next to training, against the offline step.

    python benchmarks/online_step.py --threads 1                      # the recipes' settings
    python benchmarks/online_step.py --only online_drdo --k 2 4 8 --max-new-tokens 24 48   # how sampling scales
    python benchmarks/online_step.py --rounds 1 --windows 1 --steps-per-window 1 --warmup-steps 0 --pairs 2   # smoke

On the embedded default (the shipped SFT policy and Oracle, its training prompts and pairs), each
configuration trains one of the shipped recipes with its own settings (``configs/<name>.yaml`` over
``configs/base.yaml``'s clipping and seed), the same number of pairs per step for all (``--pairs``,
default the online recipes' prompts per step, one pair a prompt):

- ``drdo``, ``dpo``: the offline recipes, Oracle scores read from the data (DPO: live reference);
- ``online_drdo``, ``online_dpo``: the online recipes, each step sampling ``k`` responses to each of
  ``--pairs`` prompts from the current policy, scoring them with the Oracle in memory and training
  on the best-against-worst pairs (a prompt whose k scores all tie gives none: pairs/s counts the pairs
  trained). ``--k`` and ``--max-new-tokens`` take several values: one online row per combination.

Like ``train_throughput.py`` (whose :class:`StepClock` and load helpers this reuses), each
configuration runs in a fresh process through a real ``lightning.Trainer`` (logger, progress bar,
checkpointing and validation off; the ``NonFiniteGuard`` the CLI adds), interleaved in rounds whose
order rotates, and a step is timed from the end of one optimizer step to the end of the next. Per
row: seconds per step (the median over ``--rounds x --windows`` windows of ``--steps-per-window``
steps, after ``--warmup-steps``), pairs/s and samples/s (responses sampled) at that step time, and
where the step's time goes, as shares of the timed steps' total time (pooled over windows, so the
shares add up):

- sampling: the sampler's call (``generate`` with the KV cache, eval mode);
- scoring: the Oracle's call on the step's samples;
- KL estimate: the two forwards over the samples (policy and starting policy) behind
  ``train/online/kl``, taken on every step here (``online.kl_every_n_steps`` 1);
- training: the loss's forward (a live reference's forward included), the backward, clipping and the
  optimizer's update;
- other: the rest (prompt batches, pairing and collating, logging, the framework's hooks).

The phases are timed by wrapping, in the benchmark's process, the online source's sampler and judge,
the module's ``loss_and_outputs`` and the objectives' base module's ``sample_logps``, and by Lightning's backward
and optimizer hooks: nothing in the library is changed. Peak memory is the high-water resident set
(``ru_maxrss``) of the configuration's own process (on CUDA, ``torch.cuda.max_memory_allocated``), the
Oracle in memory on the online rows; "weights MiB" is what the process holds of model parameters and
buffers: the policy, a frozen reference or starting policy, the Oracle. The output starts with the
machine's load average at the start and the end, and the cores other processes kept busy meanwhile.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import StepClock, load_since, load_start, resident_mb, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Configurations, in table order: each trains the shipped recipe of its name.
CONFIGS = {"drdo": "DRDO", "dpo": "DPO, live ref", "online_drdo": "online DRDO", "online_dpo": "online DPO, live ref"}
ONLINE = ("online_drdo", "online_dpo")
# Where a step's time goes; "other" is what is left of the step.
PHASES = ("sampling", "scoring", "kl", "training")
PHASE_LABELS = {"sampling": "sampling", "scoring": "scoring", "kl": "KL estimate", "training": "training"}


# ---------------------------------------------------------------------------------------
# One configuration, in its own process


class PhaseClock:
    """Seconds spent in each of :data:`PHASES` so far, added up by timed calls and by start/stop pairs,
    with a copy of the totals taken at every :class:`StepClock` tick (:meth:`mark`); and what each step
    sampled and trained on."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.marks: list[dict[str, float]] = []  # the totals at each tick
        self.started: dict[str, float] = {}
        self.steps: list[dict[str, int]] = []  # per step: samples, sampled tokens, pairs trained
        self.current = {"samples": 0, "sampled_tokens": 0, "pairs": 0}

    def start(self, phase: str) -> None:
        self.sync()
        self.started[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        self.sync()
        self.totals[phase] += time.perf_counter() - self.started.pop(phase)

    def timed(self, phase: str, call):
        """``call``, its time added to ``phase``."""

        @functools.wraps(call)
        def wrapper(*args, **kwargs):
            self.start(phase)
            try:
                return call(*args, **kwargs)
            finally:
                self.stop(phase)

        return wrapper

    def mark(self, step_ended: bool) -> None:
        self.marks.append(dict(self.totals))
        if step_ended:
            self.steps.append(self.current)
            self.current = {"samples": 0, "sampled_tokens": 0, "pairs": 0}


def window_phases(times: list[float], marks: list[dict[str, float]], warmup: int, steps_per_window: int) -> list[dict]:
    """Each window's seconds (``StepClock.windows``' windows) and the seconds of each phase within it,
    from the phase totals marked at the same ticks as ``times``."""
    starts = range(warmup, len(times) - steps_per_window, steps_per_window)
    return [{"seconds": times[i + steps_per_window] - times[i],
             **{p: marks[i + steps_per_window][p] - marks[i][p] for p in PHASES}} for i in starts]


def model_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor once (a frozen copy is its own)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def build(name: str, args):
    """The recipe's module and data module, at ``args.pairs`` pairs (prompts online) per step and, online,
    ``args.k`` samples of at most ``args.max_new_tokens`` tokens per prompt; validation data left out."""
    from drdo_lightning import PreferenceDataModule
    from drdo_lightning.recipes import read_config, recipe_objective

    recipe = read_config(name)
    model_args = dict(recipe["model"]["init_args"])
    if name in ONLINE:
        # The KL estimate on every step (the recipes take it every 10th): its share is what it costs.
        model_args["online"] = {**model_args["online"], "k": args.k, "max_new_tokens": args.max_new_tokens,
                                "kl_every_n_steps": 1}
    data_args = {**recipe["data"], "val_file": None, "batch_size": args.pairs, "cache_dir": None,
                 "tokenizer": model_args["model"]}
    return recipe_objective(name)(**model_args), PreferenceDataModule(**data_args)


def worker(args) -> None:
    """Train one configuration; write its window and phase times, step counts and peak memory to ``--result-file``."""
    import lightning as L
    import torch

    import drdo_lightning.objectives.base as base
    from drdo_lightning.reliability import NonFiniteGuard
    from drdo_lightning.recipes import base_config, read_config

    torch.set_num_threads(args.threads)
    clock = StepClock(args.device)
    phases = PhaseClock(torch.cuda.synchronize if args.device == "cuda" else (lambda: None))  # as StepClock waits
    module, data = build(args.worker, args)
    loss_and_outputs = module.loss_and_outputs

    def counted_loss(batch, stage):  # the pairs the step trains on, online pairs and ties included
        phases.current["pairs"] += batch["chosen_input_ids"].shape[0]
        return loss_and_outputs(batch, stage)

    module.loss_and_outputs = phases.timed("training", counted_loss)
    base.sample_logps = phases.timed("kl", base.sample_logps)  # the name log_online calls

    held = []  # the Oracle's model, for the weights in memory

    class Phases(L.Callback):
        def on_train_start(self, trainer, pl_module):
            online = pl_module.online_source
            if online is not None:  # built in setup: wrap its sampler and its judge
                sampler = online.sampler
                scorer = getattr(online.judge, "scorer", None)  # a reward-model judge's (a registered one has none)
                held.extend([scorer.model] if scorer is not None else [])

                def counted_sampler(*call):
                    samples = sampler(*call)
                    phases.current["samples"] += len(samples.response_ids)
                    phases.current["sampled_tokens"] += sum(map(len, samples.response_ids))
                    return samples

                online.sampler = phases.timed("sampling", counted_sampler)
                online.judge = phases.timed("scoring", online.judge)
            clock.tick()
            phases.mark(step_ended=False)

        def on_before_backward(self, trainer, pl_module, loss):
            phases.start("training")

        def on_after_backward(self, trainer, pl_module):
            phases.stop("training")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # then clipping and the update
            phases.start("training")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "training" in phases.started:  # not when every prompt tied: no loss, no update
                phases.stop("training")
            clock.tick()
            phases.mark(step_ended=True)

    base = read_config(base_config())
    L.seed_everything(base["seed_everything"], verbose=False)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision="32-true",
        max_steps=args.warmup_steps + args.windows * args.steps_per_window,
        gradient_clip_val=base["trainer"]["gradient_clip_val"], callbacks=[NonFiniteGuard(), Phases()],
        logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=Path(args.result_file).parent,  # the run's temporary folder: the samples the recipe logs
    )
    trainer.fit(module, datamodule=data)
    windows = window_phases(clock.times, phases.marks, args.warmup_steps, args.steps_per_window)
    if len(windows) != args.windows:
        raise RuntimeError(f"{args.worker}: measured {len(windows)} windows, expected {args.windows}")
    result = {
        "windows": windows,
        "steps": phases.steps[args.warmup_steps:],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "end_rss_mb": resident_mb(),
        "weights_mb": model_bytes(module, *held) / 2**20,
    }
    Path(args.result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# The orchestrator: rounds of subprocesses, then the table


@dataclass(frozen=True)
class Config:
    """One row: a recipe, and for an online one its samples per prompt and their length limit."""

    recipe: str
    k: int | None = None
    max_new_tokens: int | None = None

    @property
    def name(self) -> str:
        return self.recipe if self.k is None else f"{self.recipe}_k{self.k}_t{self.max_new_tokens}"

    @property
    def label(self) -> str:
        online = "" if self.k is None else f", k={self.k}, <={self.max_new_tokens} new tokens"
        return CONFIGS[self.recipe] + online


@dataclass
class Row:
    name: str
    label: str
    pairs_per_step: float  # mean over the timed steps (online: prompts whose k scores all tied give none)
    step_s: float  # the median window / steps per window
    pairs_per_s: float
    samples_per_s: float | None  # responses sampled per second; None offline
    response_tokens: float | None  # mean tokens of a sampled response; None offline
    sampling: float  # shares of the timed steps' time
    scoring: float
    kl: float
    training: float
    other: float
    peak_mb: float  # peak RSS, or peak GPU memory allocated on CUDA
    weights_mb: float


def configs(args) -> list[Config]:
    out = []
    for recipe in CONFIGS:
        if recipe not in args.only:
            continue
        if recipe in ONLINE:
            out += [Config(recipe, k, t) for k in args.k for t in args.max_new_tokens]
        else:
            out.append(Config(recipe))
    return out


WORKER_OPTIONS = ("device", "threads", "warmup_steps", "windows", "steps_per_window", "pairs")


def run_worker(config: Config, args, result_file: Path) -> dict:
    options = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKER_OPTIONS]
    online = [f"--k={config.k}", f"--max-new-tokens={config.max_new_tokens}"] if config.k is not None else []
    command = [sys.executable, __file__, "--worker", config.recipe, f"--result-file={result_file}", *options, *online]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)  # the recipes' paths are the repository's
    if done.returncode != 0:
        raise RuntimeError(f"configuration {config.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def summarize(config: Config, runs: list[dict], args) -> Row:
    """One row from a configuration's rounds: the median window's step time; shares of the pooled windows' time."""
    windows = [w for run in runs for w in run["windows"]]
    steps = [s for run in runs for s in run["steps"]]
    step_s = statistics.median(w["seconds"] for w in windows) / args.steps_per_window
    total = sum(w["seconds"] for w in windows)
    shares = {p: sum(w[p] for w in windows) / total for p in PHASES}
    pairs, samples = (statistics.fmean(s[key] for s in steps) for key in ("pairs", "samples"))
    online = config.k is not None
    return Row(
        config.name, config.label, pairs, step_s, pairs / step_s,
        samples / step_s if online else None,
        sum(s["sampled_tokens"] for s in steps) / sum(s["samples"] for s in steps) if online else None,
        **shares, other=max(0.0, 1 - sum(shares.values())),
        peak_mb=max(run["peak_gpu_mb"] if args.device == "cuda" else run["peak_rss_mb"] for run in runs),
        weights_mb=runs[0]["weights_mb"],
    )


def report(rows: list[Row], args, loads: tuple[float, float, float]) -> str:
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    lines = [
        f"embedded default, the shipped recipes at {args.pairs} pairs per step; device {args.device}, fp32, "
        f"{args.threads} threads; {args.rounds} rounds x {args.windows} windows x {args.steps_per_window} steps after "
        f"{args.warmup_steps} warm-up steps",
        f"load average {loads[0]:.2f} at start, {loads[1]:.2f} at end (with this benchmark's threads); "
        f"other processes used {loads[2]:.2f} cores on average during the run",
        "",
        f"| configuration | pairs/step | step ms | pairs/s | samples/s | response tokens | sampling | scoring "
        f"| KL estimate | training | other | {memory} | weights MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def maybe(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r.label} | {r.pairs_per_step:.1f} | {r.step_s * 1e3:.0f} | {r.pairs_per_s:.1f} | "
                     f"{maybe(r.samples_per_s, '.1f')} | {maybe(r.response_tokens, '.1f')} | {r.sampling:.1%} | "
                     f"{r.scoring:.1%} | {r.kl:.1%} | {r.training:.1%} | {r.other:.1%} | {r.peak_mb:.0f} | "
                     f"{r.weights_mb:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    from drdo_lightning.recipes import read_config

    recipe = read_config("online_drdo")  # the defaults: the online recipes' settings
    online = recipe["model"]["init_args"]["online"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="run a subset")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs per step (online: prompts per step); default the online recipes' batch_size")
    parser.add_argument("--k", type=int, nargs="+", default=[online["k"]], help="online: responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[online["max_new_tokens"]],
                        help="online: the longest response")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads in every process")
    parser.add_argument("--rounds", type=int, default=2, help="subprocess rounds; each runs every configuration once")
    parser.add_argument("--windows", type=int, default=3, help="measured windows per configuration per round")
    parser.add_argument("--steps-per-window", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                        help="first wait (up to --wait-timeout s) until the 1-minute load average is below LOAD")
    parser.add_argument("--wait-timeout", type=float, default=2400.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows, settings and load here")
    # Internal: run one configuration (the orchestrator starts these).
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pairs is None:
        args.pairs = recipe["data"]["batch_size"]
    if args.worker:  # one value each, as the orchestrator passes them
        args.k, args.max_new_tokens = args.k[0], args.max_new_tokens[0]
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    if args.wait_for_load is not None:
        wait_for_quiet(args.wait_for_load, args.wait_timeout)
    chosen = configs(args)
    start = load_start()
    results: dict[str, list[dict]] = {c.name: [] for c in chosen}
    with tempfile.TemporaryDirectory(prefix="drdo-online-bench-") as tmp:
        for r in range(args.rounds):
            for config in chosen[r % len(chosen):] + chosen[: r % len(chosen)]:
                print(f"round {r + 1}/{args.rounds}: {config.name}", file=sys.stderr, flush=True)
                results[config.name].append(run_worker(config, args, Path(tmp) / f"{config.name}-{r}.json"))
    loads = load_since(start)
    rows = [summarize(c, results[c.name], args) for c in chosen]
    print(report(rows, args, loads))
    if args.json is not None:
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "result_file", "json")}
        load = dict(zip(("average_at_start", "average_at_end", "other_processes_cores"), loads))
        args.json.write_text(json.dumps({"settings": settings, "load": load, "rows": [asdict(r) for r in rows],
                                         "raw": results}, indent=1))
    return rows


if __name__ == "__main__":
    main()
