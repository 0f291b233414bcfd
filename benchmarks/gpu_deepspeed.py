"""DRDO with real CUDA DeepSpeed ZeRO-2 and ZeRO-3 (or FSDP) in bf16: tokens/s and peak GPU memory.

    python benchmarks/gpu_deepspeed.py                 # every GPU of the machine, 30 steps per stage
    python benchmarks/gpu_deepspeed.py --steps 60 --batch-size 8
    python benchmarks/gpu_deepspeed.py --presets deepspeed_zero2 deepspeed_zero3 fsdp --lora   # LoRA adapters

Needs a CUDA GPU (CI never runs it). It builds a ~134M-parameter Llama from a config (random
init, 12 layers, hidden 768, vocabulary 32,000) with the embedded default's tokenizer, then
trains the DRDO recipe (``configs/drdo.yaml``: the embedded default's Oracle-scored pairs) with
each strategy preset of ``--presets`` (default ``configs/strategies/deepspeed_zero{2,3}.yaml``)
and ``--trainer.precision bf16-mixed``, with ``--lora`` as LoRA training (rank 16 on every linear
layer), each in its own ``python -m drdo_lightning fit`` process, and prints one line per preset.

tokens/s: non-padding tokens of chosen and rejected responses and prompts, summed over ranks,
per second of training after ``--warmup`` steps (the first steps include DeepSpeed's and CUDA's
start-up). Peak memory: ``torch.cuda.max_memory_allocated`` of rank 0 over the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class Throughput(L.Callback):
    """Measures tokens/s after ``warmup`` steps and peak GPU memory; rank 0 writes them to ``out``."""

    def __init__(self, out: str, warmup: int) -> None:
        self.out, self.warmup = out, warmup
        self.tokens, self.start = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:  # global_step already counts this batch's step
            self.tokens += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        tokens = trainer.strategy.reduce(torch.tensor(float(self.tokens), device=pl_module.device), reduce_op="sum")
        if trainer.is_global_zero:
            result = {
                "world_size": trainer.world_size,
                "steps": trainer.global_step - self.warmup,
                "tokens_per_s": float(tokens) / seconds,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
            Path(self.out).write_text(json.dumps(result))


def build_model(path: Path) -> int:
    """Save a randomly initialised ~134M-parameter Llama and the embedded default's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "embedded_default" / "base_model")
    config = LlamaConfig(
        vocab_size=32_000,  # a realistic LM head; the tokenizer uses the first ids only
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


LORA = "{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}"


def run_stage(preset: str, model_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    out = work / f"{preset}.json"
    callbacks = [{"class_path": "gpu_deepspeed.Throughput", "init_args": {"out": str(out), "warmup": args.warmup}}]
    command = [
        sys.executable, "-m", "drdo_lightning", "fit",
        "--config", str(ROOT / "configs" / "drdo.yaml"),
        "--config", str(ROOT / "configs" / "strategies" / f"{preset}.yaml"),
        "--model.model", str(model_dir),
        "--trainer.precision", "bf16-mixed",
        "--trainer.max_steps", str(args.warmup + args.steps),
        "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", json.dumps(callbacks),
        "--trainer.default_root_dir", str(work / preset),
        "--data.batch_size", str(args.batch_size),
        "--data.cache_dir", str(work / "cache"),
        *(["--model.lora", LORA] if args.lora else []),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per GPU")
    parser.add_argument("--presets", nargs="+", default=["deepspeed_zero2", "deepspeed_zero3"],
                        help="strategy presets of configs/strategies/, one run each")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the whole model")
    parser.add_argument("--json", type=Path, default=None, help="also write each preset's result here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n_params = build_model(work / "model")
        print(f"Llama {n_params / 1e6:.0f}M parameters, {torch.cuda.get_device_name()}, batch {args.batch_size} pairs per GPU")
        results = {}
        for preset in args.presets:
            r = results[preset] = run_stage(preset, work / "model", work, args)
            if args.json is not None:  # after every stage, so a cut-off run keeps what it measured
                args.json.write_text(json.dumps({"parameters": n_params, "batch_size": args.batch_size,
                                                 "lora": args.lora, "stages": results}, indent=1))
            print(f"{preset}{' + LoRA' if args.lora else ''} bf16: {r['tokens_per_s']:,.0f} tokens/s on "
                  f"{r['world_size']} GPU(s) over {r['steps']} steps, peak memory {r['peak_memory_gib']:.2f} GiB (rank 0)")


if __name__ == "__main__":
    main()
