"""Correctness on CUDA of what the GPU run times: the fused LM head, packed batches, DeepSpeed, the export.

    python benchmarks/gpu_checks.py              # one CUDA GPU (bash benchmarks/gpu_all.sh runs it first)
    python benchmarks/gpu_checks.py --dry-run    # the same checks on CPU at a tiny size (tests/test_benchmark.py)

Every check prints one line, ``PASS``, ``FAIL`` or ``SKIP``, with the measured difference and its
tolerance; the exit status is 1 when any check fails. What each compares:

- ``step``: a training step of DRDO, DPO (live reference) and ORPO (NLL over the prompt too) with the
  default head, fused with the loss (:func:`logprobs.fused_head_loss`, several chunks of pairs per
  batch), against the same step with ``chunked_head=False`` (the one-piece head, never fused), on
  architectures of ``tests/architectures.py`` (grouped-query attention, biased projections, a fused
  qkv, a hidden state projected before the head, and Gemma-2's soft-capped head, which must not fuse),
  on a padded batch (so the policy packs it where the model allows), in fp32 and under bf16 autocast
  (what ``--trainer.precision bf16-mixed`` runs). The difference is the larger of the losses'
  (relative to ``max(1, |loss|)``) and the gradients' (relative to the largest gradient entry, as in
  ``tests/test_chunked_head.py``). fp32: at most ``FP32_TOLERANCE``. bf16, part by part (the
  values, each parameter's gradient): the fused step's distance from the fp32 step at most
  ``BF16_FACTOR`` times the unfused bf16 step's own, never asking for less than ``BF16_FLOOR``
  (bf16 rounding is the yardstick; a wrong gradient is off by its whole size).
- ``packed``: response log-probs, rewards and the rejected responses' token unlikelihood, and the
  gradients of a loss of all three, of packed rows (block-diagonal attention from the position
  ids) against the padded rows, with SDPA in fp32 (at most ``FP32_TOLERANCE``) and, where
  ``flash_attn`` imports, with flash-attention's varlen kernel in bf16 (packed flash-attention's
  distance from fp32 SDPA at most ``BF16_FACTOR`` times padded flash-attention's). A model that
  declines to pack (:func:`packing.supports_packing`) fails the check.
- ``deepspeed``: DRDO through the real command line (``python -m drdo_lightning fit``) on one device
  with ``configs/strategies/deepspeed_zero{2,3}.yaml`` against the same fit without DeepSpeed,
  ``32-true``, on long-tailed lengths (padded, so packed); the per-step loss within ``LOSS_RTOL``
  relative (a wrong shard, a missing gradient or a metric on the wrong device moves it by 1e-2 or
  fails the run).
- ``export``: the ZeRO-3 run's export (``ExportHuggingFace``, gathered from the shards) loaded by
  ``transformers`` alone in a fresh process (``drdo_lightning`` never imported there): its per-token
  log-probs within ``EXPORT_ATOL`` of the run without DeepSpeed's export, which training moved by
  more than ``MOVED_FACTOR`` times that from the starting model.

On CUDA the DeepSpeed fits run in subprocesses, started first, beside the in-process checks.
``--dry-run`` runs all of it on CPU (DeepSpeed on CPU, ``gloo``), tiny models, bf16 autocast on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]  # train_throughput's data, the architecture matrix

from architectures import ARCHITECTURES, build  # noqa: E402
from train_throughput import Preset, prepare  # noqa: E402

import drdo_lightning.heads as heads  # noqa: E402
from drdo_lightning import DPO, DRDO, ORPO, CausalLMWithRewardHead  # noqa: E402
from drdo_lightning.heads import Wanted, sequence_values  # noqa: E402
from drdo_lightning.models import head_input_width, remove_dropout  # noqa: E402

FP32_TOLERANCE = 1e-4
BF16_FACTOR = 2.0
# bf16 yardsticks below this are rounding luck, not a scale: never ask for less than this.
BF16_FLOOR = 1e-3
LOSS_RTOL = 1e-3
EXPORT_ATOL = 1e-3
MOVED_FACTOR = 10.0

# Architectures of tests/architectures.py for the step: Llama (grouped-query attention), Qwen2 (biased
# q/k/v), Phi-3 (fused qkv and MLP), OPT-350M (a projected hidden state before the head; does not pack)
# and Gemma-2 (a soft-capped head: never fused).
STEP_ARCHITECTURES = ("llama", "qwen2", "phi3", "opt-350m-shape", "gemma2")
NOT_FUSED = {"gemma2"}
# For packing: the families that pack (OPT does not in transformers 5; Gemma-2's sliding window is its own case).
PACKED_ARCHITECTURES = ("llama", "qwen2", "phi3")
OBJECTIVES: dict[str, tuple[type, dict]] = {
    "drdo": (DRDO, {"reward_head_seed": 0}),
    "dpo": (DPO, {}),
    "orpo": (ORPO, {"nll_on_prompt": True}),
}


class Size(NamedTuple):
    vocab: int
    pairs: int
    prompt: tuple[int, int]  # prompt lengths drawn from [low, high]
    response: tuple[int, int]
    fit: Preset  # the DeepSpeed fits' model and batch (train_throughput.prepare)
    fit_steps: int


SIZES = {
    "cuda": Size(vocab=32_000, pairs=8, prompt=(4, 40), response=(4, 80),
                 fit=Preset(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=32_000,
                            tie_embeddings=False, prompt=32, response=64, pairs=8), fit_steps=4),
    "cpu": Size(vocab=96, pairs=3, prompt=(2, 6), response=(2, 8),
                fit=Preset(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, vocab=512,
                           tie_embeddings=False, prompt=8, response=24, pairs=4), fit_steps=2),
}


class Check(NamedTuple):
    name: str
    status: str  # PASS, FAIL or SKIP
    measured: float | None
    tolerance: float | None
    detail: str = ""

    def line(self) -> str:
        figures = "" if self.measured is None else f": {self.measured:.3g} <= {self.tolerance:.3g}"
        return f"{self.status} {self.name}{figures}" + (f" ({self.detail})" if self.detail else "")


def judged(name: str, measured: float, tolerance: float, detail: str = "") -> Check:
    ok = measured <= tolerance  # NaN fails
    return Check(name, "PASS" if ok else "FAIL", measured, tolerance, detail)


def reported(checks: list[Check]) -> list[Check]:
    """``checks``, each printed as it is known (a run cut off by its time limit keeps what it printed)."""
    for check in checks:
        print(check.line(), flush=True)
    return checks


# ---------------------------------------------------------------------------------------
# Differences between two results: (values, {parameter: gradient})


Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


def distances(got: Result, want: Result) -> dict[str, float]:
    """Per part, ``values`` and each parameter: the values' largest difference relative to
    ``max(1, |values|)``, each gradient's relative to the largest gradient entry of ``want`` (some
    gradients are rounding noise around zero whatever the head; only the real ones' scale makes a
    difference meaningful). Infinite for a gradient that one side lacks."""
    (values, grads), (want_values, want_grads) = got, want
    scale = max(float(g.abs().max()) for g in want_grads.values())
    out = {"values": float((values.double() - want_values.double()).abs().max()) / max(1.0, float(want_values.abs().max()))}
    for name in grads.keys() | want_grads.keys():
        both = name in grads and name in want_grads
        out[name] = float((grads[name].double() - want_grads[name].double()).abs().max()) / scale if both else float("inf")
    return out


def distance(got: Result, want: Result) -> float:
    """The largest of :func:`distances`."""
    return max(distances(got, want).values())


def bf16_check(name: str, candidate: Result, yardstick: Result, reference: Result, detail: str) -> Check:
    """``candidate`` (bf16) no further from the fp32 ``reference`` than ``BF16_FACTOR`` times ``yardstick``
    (bf16), part by part (each parameter's gradient has its own yardstick: the LM head's rounding is not the
    body's); reported for the part nearest its bound."""
    measured, allowed = distances(candidate, reference), distances(yardstick, reference)
    allowed = {part: BF16_FACTOR * max(allowed.get(part, 0.0), BF16_FLOOR) for part in measured}
    worst = max(measured, key=lambda part: measured[part] / allowed[part])
    return judged(name, measured[worst], allowed[worst], f"{detail}; nearest its bound: {worst}")


def precision_context(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Batches


def padded_pairs(size: Size, device: str, seed: int) -> dict[str, torch.Tensor]:
    """A batch of ``size.pairs`` pairs of random prompt and response lengths, left-padded to one length
    (as chosen and rejected share a forward), with Oracle scores."""
    generator = torch.Generator().manual_seed(seed)

    def draw(bounds: tuple[int, int]) -> list[int]:
        return torch.randint(bounds[0], bounds[1] + 1, (size.pairs,), generator=generator).tolist()

    prompts = draw(size.prompt)
    responses = {side: draw(size.response) for side in ("chosen", "rejected")}
    length = max(p + r for side in responses.values() for p, r in zip(prompts, side))
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.zeros(size.pairs, length, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for b, (p, r) in enumerate(zip(prompts, responses[side])):
            start = length - p - r
            ids[b, start:] = torch.randint(1, size.vocab, (p + r,), generator=generator)
            mask[b, start:] = 1
            labels[b, start + p:] = ids[b, start + p:]
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
        batch[f"{side}_score"] = torch.randn(size.pairs, generator=generator)
    return {k: v.to(device) for k, v in batch.items()}


def largest_pair(batch: dict[str, torch.Tensor]) -> int:
    """An upper bound of one pair's positions through the LM head: its chosen and rejected tokens."""
    return int((batch["chosen_attention_mask"].sum(-1) + batch["rejected_attention_mask"].sum(-1)).max())


# ---------------------------------------------------------------------------------------
# The fused training step against the unfused one


@contextlib.contextmanager
def counting_fused_calls() -> Iterator[list[int]]:
    """Counts the chunks of every :func:`logprobs.fused_head_loss` call inside the context."""
    calls: list[int] = []
    original = heads.logprobs.fused_head_loss

    def counted(*args):
        calls.append(len(args[5]))
        return original(*args)

    heads.logprobs.fused_head_loss = counted
    try:
        yield calls
    finally:
        heads.logprobs.fused_head_loss = original


@contextlib.contextmanager
def chunk_rows(rows: int, vocab: int) -> Iterator[None]:
    """Chunks of ``rows`` positions: a few chunks of whole pairs per batch instead of one at these sizes."""
    original = heads.HEAD_CHUNK_ELEMENTS
    heads.HEAD_CHUNK_ELEMENTS = rows * vocab
    try:
        yield
    finally:
        heads.HEAD_CHUNK_ELEMENTS = original


def training_step(module, batch: dict[str, torch.Tensor], device: str, precision: str) -> Result:
    """One training step's loss and the policy's gradients, as Lightning runs it (autocast around the
    step, backward outside)."""
    module.policy.zero_grad(set_to_none=True)
    with precision_context(device, precision):
        loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    return loss.detach().float()[None], grads


def step_module(objective: str, path: Path, chunked_head: bool | None, device: str):
    cls, options = OBJECTIVES[objective]
    module = cls(str(path), chunked_head=chunked_head, **options)
    torch.manual_seed(0)
    module.configure_model()
    module.log = lambda *args, **kwargs: None  # no trainer to log to
    return module.to(device)


def step_checks(size: Size, device: str, work: Path) -> list[Check]:
    checks = []
    batch = padded_pairs(size, device, seed=1)
    for architecture in STEP_ARCHITECTURES:
        path = work / f"step-{architecture}"
        build(architecture, size.vocab).save_pretrained(path)
        for objective in OBJECTIVES:
            fused, unfused = step_module(objective, path, None, device), step_module(objective, path, False, device)
            results, chunks = {}, []
            for precision in ("fp32", "bf16"):
                with chunk_rows(largest_pair(batch), size.vocab), counting_fused_calls() as calls:
                    results["fused", precision] = training_step(fused, batch, device, precision)
                    chunks += calls
                results["unfused", precision] = training_step(unfused, batch, device, precision)
            expected = architecture not in NOT_FUSED
            path_note = f"fused over {chunks} chunks" if chunks else "not fused"
            name = f"step/{objective}/{architecture}"
            if bool(chunks) != expected or (expected and min(chunks) < 2):
                checks.append(Check(name, "FAIL", None, None, f"{path_note}; expected {'fused over 2+ chunks' if expected else 'not fused'}"))
                continue
            checks.append(judged(f"{name}/fp32", distance(results["fused", "fp32"], results["unfused", "fp32"]),
                                 FP32_TOLERANCE, path_note))
            checks.append(bf16_check(f"{name}/bf16", results["fused", "bf16"], results["unfused", "bf16"],
                                     results["unfused", "fp32"], f"{path_note}; yardstick: the unfused bf16 step"))
    return checks


# ---------------------------------------------------------------------------------------
# Packed against padded log-probs


def packing_model(architecture: str, vocab: int, attention: str, dtype: torch.dtype, device: str) -> CausalLMWithRewardHead:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(ARCHITECTURES[architecture](vocab), attn_implementation=attention)
    remove_dropout(lm)
    torch.manual_seed(1)
    model = CausalLMWithRewardHead(lm, CausalLMWithRewardHead.new_reward_head(head_input_width(lm)))
    return model.to(device=device, dtype=dtype).train()


def values_and_grads(model: CausalLMWithRewardHead, batch: dict[str, torch.Tensor], packed: bool) -> Result:
    """z, r̂ and the token unlikelihood per sequence, and the gradients of a loss that weighs each."""
    inputs = [torch.cat([batch[f"{side}_{key}"] for side in ("chosen", "rejected")])
              for key in ("input_ids", "attention_mask", "labels")]
    model.zero_grad(set_to_none=True)
    values = sequence_values(model, *inputs, Wanted(token_unlikelihood=True), packed=packed)
    stacked = torch.stack([values.logps, values.rewards, values.token_unlikelihood]).float()
    (stacked * torch.tensor([1.0, 0.5, 0.1], device=stacked.device)[:, None]).sum().backward()
    return stacked.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def packing_checks(size: Size, device: str) -> list[Check]:
    checks = []
    batch = padded_pairs(size, device, seed=2)
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    for architecture in PACKED_ARCHITECTURES:
        model = packing_model(architecture, size.vocab, "sdpa", torch.float32, device)
        reference = values_and_grads(model, batch, packed=False)
        packed = values_and_grads(model, batch, packed=True)
        name = f"packed/sdpa/{architecture}"
        if model.packing_for(mask) is None:  # its probe's verdict, kept from the packed call
            checks.append(Check(name, "FAIL", None, None, "the model declined to pack (supports_packing) with SDPA"))
        else:
            checks.append(judged(f"{name}/fp32", distance(packed, reference), FP32_TOLERANCE, "against padded SDPA"))
        if not flash:
            checks.append(Check(f"packed/flash_attention_2/{architecture}", "SKIP", None, None,
                                "flash_attn does not import here" if device == "cuda" else "CUDA only"))
            continue
        model = packing_model(architecture, size.vocab, "flash_attention_2", torch.bfloat16, device)
        padded_flash = values_and_grads(model, batch, packed=False)
        packed_flash = values_and_grads(model, batch, packed=True)
        name = f"packed/flash_attention_2/{architecture}/bf16"
        if model.packing_for(mask) is None:
            checks.append(Check(name, "FAIL", None, None, "the model declined to pack with flash-attention"))
        else:
            checks.append(bf16_check(name, packed_flash, padded_flash, reference,
                                     "varlen; yardstick: padded flash-attention against fp32 SDPA"))
    return checks


# ---------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2/3 on one device, and the export


FITS = ("plain", "deepspeed_zero2", "deepspeed_zero3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_command(fit: str, size: Size, model: Path, data: Path, root: Path, device: str) -> list[str]:
    p = size.fit
    command = [
        sys.executable, "-m", "drdo_lightning", "fit", "--model", "DRDO", "--model.model", str(model),
        "--model.learning_rate", "1e-3", "--model.reward_head_seed", "0",  # large enough to move the export visibly
        "--data.train_file", str(data), "--data.chosen_score_column", "oracle_chosen",
        "--data.rejected_score_column", "oracle_rejected", "--data.max_prompt_length", str(p.prompt),
        "--data.max_length", str(p.prompt + p.response), "--data.batch_size", str(p.pairs),
        "--data.cache_dir", str(root / "cache"),
        "--trainer.default_root_dir", str(root), "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
        "--trainer.devices", "1", "--trainer.precision", "32-true", "--trainer.max_steps", str(size.fit_steps),
        "--trainer.limit_val_batches", "0", "--trainer.gradient_clip_val", "1.0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
        "--trainer.callbacks+=drdo_lightning.ExportHuggingFace", "--seed_everything", "0",
    ]
    if fit != "plain":
        command += ["--config", str(ROOT / "configs" / "strategies" / f"{fit}.yaml")]
    return command


def start_fits(size: Size, device: str, work: Path) -> dict[str, tuple[subprocess.Popen, Path]]:
    """The three fits, each in its own process (they run beside the in-process checks)."""
    prepare(size.fit, size.fit.pairs * size.fit_steps, work / "fit", lengths="real")
    started = {}
    for fit in FITS:
        root = work / fit
        root.mkdir()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        log = (root / "fit.log").open("w")
        command = fit_command(fit, size, work / "fit" / "model", work / "fit" / "pairs.jsonl", root, device)
        started[fit] = (subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), root)
    return started


def logged_losses(root: Path) -> dict[int, float]:
    with (root / "lightning_logs" / "version_0" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


# Run by a fresh interpreter: transformers alone loads each directory and scores the same token ids.
TRANSFORMERS_ALONE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for path in sys.argv[2:]:
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = torch.log_softmax(lm(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
    out[path] = logps.squeeze(-1).tolist()
assert not any(name.split(".")[0] == "drdo_lightning" for name in sys.modules), "drdo_lightning was imported"
print(json.dumps(out))
"""


def deepspeed_checks(started: dict[str, tuple[subprocess.Popen, Path]], size: Size, work: Path, deadline: float) -> list[Check]:
    """The fits' losses against each other, then the export, once the fits end (or ``deadline``,
    ``time.monotonic()``'s, passes: those still running then are stopped and fail)."""
    failed = {}
    for fit, (proc, root) in started.items():
        try:
            proc.wait(timeout=None if math.isinf(deadline) else max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            failed[fit] = "stopped at --fit-timeout: " + (root / "fit.log").read_text()[-600:].replace("\n", " | ")
            continue
        if proc.returncode != 0:
            failed[fit] = f"exit {proc.returncode}: " + (root / "fit.log").read_text()[-600:].replace("\n", " | ")
    if "plain" in failed:
        return [Check(f"deepspeed/{fit}", "FAIL", None, None, f"the run without DeepSpeed failed, {failed['plain']}")
                for fit in FITS[1:]] + [Check("export/deepspeed_zero3", "FAIL", None, None, "no run to compare with")]
    want = logged_losses(started["plain"][1])
    checks = []
    for fit in FITS[1:]:
        if fit in failed:
            checks.append(Check(f"deepspeed/{fit}", "FAIL", None, None, failed[fit]))
            continue
        got = logged_losses(started[fit][1])
        if sorted(got) != sorted(want):
            checks.append(Check(f"deepspeed/{fit}", "FAIL", None, None, f"logged steps {sorted(got)}, expected {sorted(want)}"))
            continue
        worst = max(abs(got[s] - v) / max(abs(v), 1e-12) for s, v in want.items())
        checks.append(judged(f"deepspeed/{fit}", worst, LOSS_RTOL,
                             f"per-step loss relative to the run without DeepSpeed, {len(want)} steps, 32-true"))
    if "deepspeed_zero3" in failed:
        return [*checks, Check("export/deepspeed_zero3", "FAIL", None, None, "the ZeRO-3 run failed")]
    ids = torch.randint(3, size.fit.vocab, (4, 24), generator=torch.Generator().manual_seed(3)).tolist()
    directories = [started["deepspeed_zero3"][1] / "export", started["plain"][1] / "export", work / "fit" / "model"]
    done = subprocess.run([sys.executable, "-c", TRANSFORMERS_ALONE, json.dumps(ids), *map(str, directories)],
                          capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        return [*checks, Check("export/deepspeed_zero3", "FAIL", None, None, done.stderr[-600:].replace("\n", " | "))]
    zero3, plain, start = (torch.tensor(v) for v in json.loads(done.stdout.strip().splitlines()[-1]).values())
    moved = float((plain - start).abs().max())
    difference = float((zero3 - plain).abs().max())
    detail = f"transformers alone; training moved the log-probs by {moved:.3g} from the start"
    if moved <= MOVED_FACTOR * EXPORT_ATOL:
        return [*checks, Check("export/deepspeed_zero3", "FAIL", difference, EXPORT_ATOL, detail + ": too little to tell")]
    return [*checks, judged("export/deepspeed_zero3", difference, EXPORT_ATOL, detail)]


# ---------------------------------------------------------------------------------------


def run_checks(device: str, work: Path, fit_timeout_s: float) -> list[Check]:
    size = SIZES[device]
    started = start_fits(size, device, work)
    deadline = time.monotonic() + fit_timeout_s
    try:
        checks = reported(step_checks(size, device, work)) + reported(packing_checks(size, device))
        return checks + reported(deepspeed_checks(started, size, work, deadline))
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                proc.kill()


def main(argv: list[str] | None = None) -> list[Check]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same checks on CPU at a tiny size")
    # On the lent GPU its time is budgeted; a dry run on a loaded CPU waits for the fits to end.
    parser.add_argument("--fit-timeout", type=float, default=None,
                        help="seconds the DeepSpeed fits may take from their start (they run together); "
                             "default 240 on the GPU, no limit in a dry run")
    parser.add_argument("--json", type=Path, default=None, help="also write every check here")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --dry-run)")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="drdo-gpu-checks-") as tmp:
        fit_timeout = args.fit_timeout if args.fit_timeout is not None else (math.inf if args.dry_run else 240.0)
        checks = run_checks(device, Path(tmp), fit_timeout)
    counts = {status: sum(c.status == status for c in checks) for status in ("PASS", "FAIL", "SKIP")}
    print(", ".join(f"{n} {status.lower()}" for status, n in counts.items()), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device, "checks": [c._asdict() for c in checks]}, indent=1))
    if counts["FAIL"]:
        sys.exit(1)
    return checks


if __name__ == "__main__":
    main()
