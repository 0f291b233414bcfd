"""Training throughput and peak memory: our trainers against TRL's ``DPOTrainer``, side by side.

    python benchmarks/train_throughput.py                       # CPU, fp32, the ~58M-parameter preset
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --preset gpu
    python benchmarks/train_throughput.py --preset tiny --rounds 1 --windows 2 --steps-per-window 1   # smoke run
    python benchmarks/train_throughput.py --lengths real --windows 8    # long-tailed lengths, with/without grouping

Every configuration trains the same Llama-architecture model (built from a config, random
init) on the same preference pairs, with the same batch size, precision, thread count, AdamW
settings and gradient clipping (max norm 1.0, the default of TRL and of our recipes). The pairs
are random token ids, with

- ``--lengths fixed`` (default): fixed prompt and response lengths, so no batch has padding and
  every configuration sees batches of the same shape (checked);
- ``--lengths real``: long-tailed lengths (:func:`real_length`: log-normal, median 30% of the
  preset's prompt or response budget, cut at the budget), so batches are padded; every
  configuration trains exactly one epoch over the same pairs (checked: same pairs, same useful
  tokens), and each trainer also runs with length-grouped batches (``*_grouped`` rows: our data
  module's ``group_by_length``; for TRL, transformers' ``train_sampling_strategy="group_by_length"``,
  its ``LengthGroupedSampler``). Rates are over the timed steps: useful (non-padding) tokens/s.

The configurations:

- ``trl_dpo``: ``trl.DPOTrainer`` with its defaults: sigmoid DPO loss, reference model computed
  live. Two settings differ from TRL's defaults so that both sides do the same work:
  ``gradient_checkpointing=False`` (TRL turns it on by default, which recomputes the forward;
  ours is off by default; ``--checkpointing`` turns it on for every configuration) and ``bf16``
  only when ``--dtype bf16``.
- ``drdo``: our DRDO student (no reference model; Oracle rewards are data columns).
- ``dpo_precomputed``: our DPO with reference log-probs precomputed before training.
- ``dpo_live``: our DPO with a live frozen reference.
- ``simpo``, ``orpo``: our reference-free baselines (one model in memory, like DRDO; no reward head).
- with ``--lora``, also each of the above with LoRA adapters (``LORA``: rank 16 on every linear
  layer), full fine-tuning's peers: TRL with ``peft_config``, whose reference is the base model
  with the adapters off, as is ours (``dpo_live_lora``).

The anchor is the hardware, not another trainer: each round first times a square GEMM and one of
the model's own shapes in the run's dtype at the same thread count (``--worker matmul``; fp32,
and also bf16 on CUDA), and each row reports the matmul FLOP/s its steps achieved
(:func:`step_flops`: the FLOPs each step really does, counted per batch) as a fraction of that peak.

Besides time and peak memory, every row reports what it trains: parameters that get gradients
and the bytes of optimizer state (AdamW's two moments per trained parameter), read from the
optimizer after training.

Our trainers run through a real ``lightning.Trainer`` (logger, progress bar and checkpointing
off, as in a quiet run) with the module's own ``training_step`` and ``configure_optimizers``,
and the ``NonFiniteGuard`` callback that the CLI always adds: exactly what ``python -m
drdo_lightning fit`` runs, minus I/O. TRL runs through ``DPOTrainer.train()`` (its default
collator, subclassed only to note the first batch's shape for the same-work check).

Each configuration runs in its own subprocess, so its peak resident memory (``ru_maxrss``:
model, optimizer, activations, data) is its own; the subprocesses are interleaved in rounds
(round r runs the configurations in an order rotated by r), so slow drifts of the machine hit
every configuration alike. A step is timed from the end of one optimizer step to the end of
the next (data loading, forward, backward, clipping, optimizer, logging: everything), and a
*window* is ``--steps-per-window`` consecutive steps after ``--warmup-steps``; each
configuration reports the median of its ``--rounds x --windows`` windows.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# Configurations, in table order. TRL DPO is the baseline every ratio is taken against.
CONFIGS = {
    "trl_dpo": "TRL DPOTrainer (live ref)",
    "drdo": "DRDO (ours)",
    "dpo_precomputed": "DPO, precomputed ref (ours)",
    "dpo_live": "DPO, live ref (ours)",
    "simpo": "SimPO, no ref (ours)",
    "orpo": "ORPO, no ref (ours)",
}
# Run only when named in --only: DRDO with the LM head in one piece (the logits of every response
# position kept for backward) or chunked, against the default (heads.HEAD_DEFAULTS); and TRL with its
# Liger option (``use_liger_kernel``: in TRL 1.16 Liger's RMSNorm, SwiGLU and RoPE kernels, the LM head
# staying TRL's own), which needs the ``liger-kernel`` package and Triton on CUDA.
EXTRA_CONFIGS = {"drdo_one_piece": "DRDO, one-piece LM head (ours)", "drdo_chunked": "DRDO, chunked LM head (ours)",
                 "trl_dpo_liger": "TRL DPOTrainer + Liger kernels (live ref)"}
# Configurations run where they install: one that fails is reported and its row left out.
OPTIONAL_CONFIGS = {"trl_dpo_liger"}
# With --lora: the same trainers with LoRA adapters. With adapters, TRL's reference and our live
# one are the base model with the adapters switched off.
LORA_CONFIGS = {
    "trl_dpo_lora": "TRL DPOTrainer + LoRA (ref: adapters off)",
    "drdo_lora": "DRDO + LoRA (ours)",
    "dpo_precomputed_lora": "DPO, precomputed ref + LoRA (ours)",
    "dpo_live_lora": "DPO + LoRA, ref: adapters off (ours)",
}
# With --lengths real: every configuration also with length-grouped batches; with --packed, ours
# also with packed batches (``--model.pack_sequences``), alone and on top of length groups.
GROUPED = "_grouped"
PACKED = "_packed"
ALL_CONFIGS = {**CONFIGS, **EXTRA_CONFIGS, **LORA_CONFIGS}
ALL_CONFIGS |= {f"{name}{GROUPED}": f"{label}, length-grouped" for name, label in ALL_CONFIGS.items()}
ALL_CONFIGS |= {f"{name}{PACKED}": f"{label}, packed" for name, label in ALL_CONFIGS.items() if not name.startswith("trl")}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
BASELINE = "trl_dpo"
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 0.05
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Preset:
    """Model and batch shape. ``pairs`` pairs per batch; each sequence is ``prompt + response`` tokens.
    ``kv_heads`` key/value heads shared by the ``heads`` query heads (grouped-query attention when fewer)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    prompt: int
    response: int
    pairs: int


PRESETS = {
    # ~58M parameters (Llama layout: untied embeddings), 8 pairs of 64 + 192 tokens.
    "cpu": Preset(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376, vocab=32000, tie_embeddings=False,
                  prompt=64, response=192, pairs=8),
    # OPT-125m-sized: hidden 768, 12 layers, 12 heads, OPT's vocabulary and tied embeddings; the
    # SwiGLU width 2048 gives the same MLP parameters as OPT's 3072-wide two-matrix MLP (~124M in all).
    "gpu": Preset(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, vocab=50272, tie_embeddings=True,
                  prompt=256, response=256, pairs=8),
    # For the CI smoke run: seconds per configuration.
    "tiny": Preset(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, vocab=512, tie_embeddings=False,
                   prompt=8, response=24, pairs=4),
    # Llama-3's vocabulary (128,256 tokens) on a small body: the LM head dominates, as it does at the
    # vocabularies users train (Llama-3, Qwen2/3 151,936, Gemma 256,000) when responses are long.
    "vocab128k": Preset(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=128256, tie_embeddings=False,
                        prompt=64, response=448, pairs=8),
    # Users' shape on a GPU: Llama-3.2-1B's layout (hidden 2048, 16 layers, 32 query and 8 key/value
    # heads, MLP 8192, Llama-3's 128,256-token vocabulary, tied embeddings; 1.24B parameters), 8 pairs
    # of 512 + 512 tokens (TRL's classic max_prompt_length and max_length).
    "llama3-1b": Preset(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                        tie_embeddings=True, prompt=512, response=512, pairs=8),
}


# ---------------------------------------------------------------------------------------
# Shared set-up: tokenizer, model and data written once, read by every configuration


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over the words ``t0 .. tN``: text made of those words tokenizes to
    exactly the ids it was written from, so TRL (which tokenizes text) and our data module see
    the same token ids. No training, nothing downloaded."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "</s>"]
    words = specials + [f"t{i}" for i in range(vocab_size - len(specials))]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def real_length(rng: random.Random, budget: int, minimum: int = 1) -> int:
    """A long-tailed length within ``budget``: log-normal with median ``0.3 x budget`` and sigma 0.75
    (so the mean is 40% of the budget and about 5% of draws hit the budget and are cut there),
    at least ``minimum``. Roughly the shape of prompt and response lengths in chat preference data
    (e.g. Anthropic HH, UltraFeedback), scaled to the preset's budgets."""
    return max(minimum, min(budget, round(0.3 * budget * math.exp(rng.gauss(0.0, 0.75)))))


def prepare(preset: Preset, n_pairs: int, workdir: Path, seed: int = 0, lengths: str = "fixed") -> int:
    """Write ``workdir/model`` (config-built Llama + tokenizer) and ``workdir/pairs.jsonl``;
    return the model's parameter count.

    ``lengths="fixed"``: prompts have ``preset.prompt`` words; responses ``preset.response - 1``
    words, to which both TRL and our data module append EOS. ``lengths="real"``: each prompt,
    chosen and rejected response draws its own length from :func:`real_length` within the same
    budgets (nothing is ever truncated). Oracle scores are random (they only feed DRDO's loss).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(preset.vocab)
    config = LlamaConfig(
        vocab_size=preset.vocab,
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.prompt + preset.response,
        tie_word_embeddings=preset.tie_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")

    rng = random.Random(seed)
    first_word = len(tokenizer.all_special_tokens)

    def text(n: int) -> str:
        return " ".join(f"t{rng.randrange(preset.vocab - first_word)}" for _ in range(n))

    with (workdir / "pairs.jsonl").open("w") as f:
        for _ in range(n_pairs):
            if lengths == "fixed":
                prompt, chosen, rejected = preset.prompt, preset.response, preset.response
            else:
                prompt = real_length(rng, preset.prompt)
                chosen, rejected = (real_length(rng, preset.response, minimum=2) for _ in range(2))
            # Responses start with a space: TRL tokenizes prompt + response as one string.
            row = {"prompt": text(prompt), "chosen": " " + text(chosen - 1), "rejected": " " + text(rejected - 1),
                   "oracle_chosen": rng.gauss(0, 1), "oracle_rejected": rng.gauss(0, 1)}
            f.write(json.dumps(row) + "\n")
    return model.num_parameters()


# ---------------------------------------------------------------------------------------
# One configuration, in its own process


class StepClock:
    """Timestamps at the start of training and at the end of every optimizer step.

    Every configuration's loop calls :meth:`tick` at those points (a Lightning callback, a TRL
    ``TrainerCallback``), and :meth:`windows` turns the ticks into window
    durations the same way for all. On CUDA each tick waits for the queued kernels.
    """

    def __init__(self, device: str) -> None:
        import torch

        self.times: list[float] = []
        self._sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.batch_shape: list[int] | None = None  # [sequences, length, response tokens] of the first batch
        self.batches: list[list[int]] = []  # [sequences, padded length, response tokens, useful tokens] per batch

    def tick(self) -> None:
        self._sync()
        self.times.append(time.perf_counter())

    def record_batch(self, labels, attention_mask, packed: bool = False) -> None:
        """Note a batch's shape, response tokens (``labels != -100``) and useful (non-padding) tokens,
        for the same-work checks and the FLOP count, and the rows and length the model computes on
        (the packed rows' with ``packed``). Call once per batch, in training order."""
        shape = [*labels.shape, int((labels != -100).sum())]
        if self.batch_shape is None:
            self.batch_shape = shape
        computed = list(labels.shape)
        if packed:
            from drdo_lightning.packing import pack

            computed = list(pack(attention_mask).position_ids.shape)
        self.batches.append([*shape, int(attention_mask.sum()), *computed])

    def windows(self, warmup: int, steps_per_window: int) -> list[float]:
        starts = range(warmup, len(self.times) - steps_per_window, steps_per_window)
        return [self.times[i + steps_per_window] - self.times[i] for i in starts]


def _lightning_run(name: str, args, clock: StepClock):
    """Our real training path: the objective's LightningModule and the data module in a Trainer.

    Returns the trained policy and its optimizer."""
    import lightning as L
    import torch

    from drdo_lightning import DPO, DRDO, ORPO, PreferenceDataModule, SimPO
    from drdo_lightning.reliability import NonFiniteGuard

    preset, path = PRESETS[args.preset], str(args.workdir / "model")
    packed, name = name.endswith(PACKED), name.removesuffix(PACKED)
    grouped, name = name.endswith(GROUPED), name.removesuffix(GROUPED)
    objective = name.removesuffix("_lora")
    optim = dict(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, lora=LORA if name != objective else None,
                 pack_sequences=packed, gradient_checkpointing=args.checkpointing)
    if objective in ("drdo_one_piece", "drdo_chunked"):
        module = DRDO(path, chunked_head=objective == "drdo_chunked", **optim)
    elif objective == "drdo":
        module = DRDO(path, **optim)
    elif objective in ("simpo", "orpo"):
        module = {"simpo": SimPO, "orpo": ORPO}[objective](path, **optim)
    else:
        module = DPO(path, precompute_reference=objective == "dpo_precomputed", **optim)
    data = PreferenceDataModule(
        str(args.workdir / "pairs.jsonl"), tokenizer=path, chosen_score_column="oracle_chosen",
        rejected_score_column="oracle_rejected", max_prompt_length=preset.prompt,
        max_length=preset.prompt + preset.response, batch_size=preset.pairs, cache_dir=None,
        group_by_length=grouped,
    )

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.tick()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick()
            clock.record_batch(torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
                               torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]), packed)

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.dtype == "bf16" else "32-true",
        max_steps=total_steps(args), gradient_clip_val=MAX_GRAD_NORM, callbacks=[NonFiniteGuard(), Clock()],
        logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return module.policy, trainer.optimizers[0]


def _trl_run(args, clock: StepClock, lora: bool = False, grouped: bool = False, liger: bool = False):
    """``trl.DPOTrainer`` with its defaults (live reference built from the model path; with ``lora``,
    adapters through ``peft_config`` and the base model as the reference; with ``liger``, TRL's
    ``use_liger_kernel``, Liger's layer kernels in the model). With ``grouped``,
    transformers' ``train_sampling_strategy="group_by_length"`` (``LengthGroupedSampler``: sorted
    within mega-batches of 50 batches, longest batch first), reading a ``length`` column (prompt
    plus the longer response, in tokens). Returns the model and optimizer."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from drdo_lightning.lora import lora_config

    preset, path = PRESETS[args.preset], str(args.workdir / "model")
    rows = [json.loads(line) for line in (args.workdir / "pairs.jsonl").open()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    if grouped:  # words are tokens (plus EOS): the sampler's lengths without tokenizing twice
        words = [len(r["prompt"].split()) + 1 + max(len(r["chosen"].split()), len(r["rejected"].split())) for r in rows]
        dataset = dataset.add_column("length", words)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.tick()

        def on_step_end(self, *_, **__):
            clock.tick()

    class Batches(DataCollatorForPreference):
        """TRL's own collator, noting the first batch's labels (as TRL builds them) for the same-work check."""

        def torch_call(self, examples):
            batch = super().torch_call(examples)
            clock.record_batch(batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
                               batch["attention_mask"])
            return batch

    class Trainer(DPOTrainer):
        def _set_signature_columns_if_needed(self):  # keep the ``length`` column for the sampler
            super()._set_signature_columns_if_needed()
            if grouped and "length" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "length"]

    config = DPOConfig(
        output_dir=str(args.workdir / f"trl-{os.getpid()}"), per_device_train_batch_size=preset.pairs,
        max_length=preset.prompt + preset.response, max_steps=total_steps(args), learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, gradient_checkpointing=args.checkpointing,
        bf16=args.dtype == "bf16", use_cpu=args.device == "cpu", report_to=[], save_strategy="no",
        disable_tqdm=True, seed=0, use_liger_kernel=liger,
        **({"train_sampling_strategy": "group_by_length"} if grouped else {}),
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    collator = Batches(pad_token_id=tokenizer.pad_token_id, max_length=config.max_length)  # TRL's default settings
    peft_config = lora_config(LORA) if lora else None
    trainer = Trainer(path, args=config, data_collator=collator, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()], peft_config=peft_config)
    trainer.train()
    return trainer.model, getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it


RUNNERS: dict[str, Callable] = {
    **{name: functools.partial(_lightning_run, name) for name in ALL_CONFIGS if name.startswith(("drdo", "dpo", "simpo", "orpo"))},
    **{name: functools.partial(_trl_run, lora="_lora" in name, grouped=name.endswith(GROUPED), liger="_liger" in name)
       for name in ALL_CONFIGS if name.startswith("trl")},
}


# ---------------------------------------------------------------------------------------
# What a step costs: matmul FLOPs, and the machine's matmul peak they are measured against


def forward_flops(p: Preset, sequences: int, length: int) -> tuple[float, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward of the decoder body over ``sequences``
    rows of ``length`` tokens (padding included: it is computed), as ``(linear, attention)``.

    linear: per token and layer, the q and o projections (``2 h^2`` multiply-adds), the k and v
    projections (``2 h kv`` with ``kv = h x kv_heads / heads``: grouped-query attention shares each
    key/value head among several query heads) and the SwiGLU MLP (``3 h m``).
    attention: ``q k^T`` and ``softmax v`` over the causal triangle, ``2 h`` multiply-adds per
    (query, key) pair with key <= query: ``h L (L + 1)`` per layer and sequence (a kernel that
    computes the full square does up to twice that; counted as the work the model needs).
    The LM head is not included: see :func:`head_flops`. Embedding lookups, norms, activations
    and the softmax are not matmuls and are not counted.
    """
    h, m = p.hidden, p.intermediate
    kv = h * p.kv_heads // p.heads  # the key and value projections' width
    linear = 2 * p.layers * sequences * length * (2 * h * h + 2 * h * kv + 3 * h * m)
    attention = 2 * p.layers * sequences * h * length * (length + 1)
    return float(linear), float(attention)


def head_flops(p: Preset, positions: int) -> float:
    """Matmul FLOPs of the LM head's forward at ``positions`` positions: ``[positions, h] x [h, V]``."""
    return 2.0 * positions * p.hidden * p.vocab


def step_flops(p: Preset, name: str, batch: list[int], device: str = "cpu", checkpointing: bool = False) -> float:
    """The matmul FLOPs one training step of configuration ``name`` does on ``batch``
    (``[sequences, padded length, response tokens, useful tokens]``, as :class:`StepClock` records it).

    Forward + backward of a layer whose weights train is 3 forwards (the backward computes the
    input's gradient and the weight's, one forward's worth each); with LoRA the base weights are
    frozen, so a linear layer's backward is the input gradient only (2 forwards in all; the rank-16
    adapters' own FLOPs, under 1% here, are left out), while attention's backward stays 2 forwards.
    The LM head runs only where logits are computed:

    - ours: at the positions that predict a response token (``response tokens``), plus each row's
      last token for DRDO's reward head (``heads.sequence_values``); trained like any
      layer (3 forwards, also where the chunked head is on: in training it is fused with the loss,
      ``logprobs.fused_head_loss``; 2 with LoRA: the head is not an adapter target);
    - TRL 1.16 (``trl.kernels.chunked_logprob``): at every position but the last of every row
      (padding and prompt included) where Triton is not used (CPU), and only at the response
      positions on CUDA; its backward recomputes the logits tile by tile before the two gradient
      products, so the head costs 4 forwards (3 with LoRA: no weight gradient). With Liger
      (``trl_dpo_liger``) the same: its kernels fuse norms, activations and rotary embeddings, no matmul.

    A live reference (TRL's and ``dpo_live``) adds one forward of the body and of the head at the
    same positions as the policy's; a precomputed one costs nothing in the step. The reward head
    (``h x 1``) and the loss are negligible and not counted. With gradient ``checkpointing`` the
    backward recomputes the body's forward: one more forward of the body.
    """
    sequences, length, response = batch[:3]
    rows, computed_length = batch[4:6] if len(batch) > 4 else (sequences, length)  # packed rows, when recorded
    base = name.removesuffix(PACKED).removesuffix(GROUPED)
    lora = base.endswith("_lora")
    objective = base.removesuffix("_lora").removesuffix("_liger")  # Liger's layer kernels do the same matmuls
    linear, attention = forward_flops(p, rows, computed_length)
    body_forward = linear + attention
    body_train = (2 if lora else 3) * linear + 3 * attention + (body_forward if checkpointing else 0.0)
    if objective == "trl_dpo":
        positions = response if device == "cuda" else sequences * (length - 1)
        return body_train + (3 if lora else 4) * head_flops(p, positions) + body_forward + head_flops(p, positions)
    positions = response + (sequences if objective.startswith("drdo") else 0)
    flops = body_train + (2 if lora else 3) * head_flops(p, positions)
    if objective == "dpo_live":
        flops += body_forward + head_flops(p, positions)
    return flops


def matmul_peak(preset: Preset, device: str, dtype: str, repeats: int = 5) -> dict[str, float]:
    """The machine's matmul throughput (FLOP/s) at the current thread count, best of ``repeats``:
    a square GEMM (2048 on CPU, 8192 on CUDA) and the preset's MLP GEMM at 4096 tokens
    (``[4096, h] x [h, m]``), in ``dtype``. The anchor is the faster of the two."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shapes = {"square": (n := 8192 if device == "cuda" else 2048, n, n),
              "mlp": (4096, preset.hidden, preset.intermediate)}
    out = {}
    for key, (rows, inner, cols) in shapes.items():
        a = torch.randn(rows, inner, device=device, dtype=torch_dtype)
        b = torch.randn(inner, cols, device=device, dtype=torch_dtype)
        a @ b  # warm-up: allocation, kernel selection
        best = math.inf
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(10 if device == "cuda" else 1):
                a @ b
            sync()
            best = min(best, (time.perf_counter() - start) / (10 if device == "cuda" else 1))
        out[key] = 2.0 * rows * inner * cols / best
    out["peak"] = max(out.values())
    return out


def total_steps(args) -> int:
    return args.warmup_steps + args.windows * args.steps_per_window


def worker(args) -> None:
    """Train one configuration and write its window times and peak memory to ``--result-file``."""
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "matmul":  # the machine's matmul peak, fp32 and (on CUDA) bf16
        dtypes = ["fp32", "bf16"] if args.device == "cuda" else ["fp32"]
        peaks = {dtype: matmul_peak(PRESETS[args.preset], args.device, dtype) for dtype in dtypes}
        Path(args.result_file).write_text(json.dumps(peaks))
        return
    if args.worker.startswith("trl"):  # what each process trains with, imported before the model exists
        import trl  # noqa: F401
    else:
        import lightning  # noqa: F401

        import drdo_lightning.objectives  # noqa: F401
    start_rss_mb = resident_mb()
    clock = StepClock(args.device)
    model, optimizer = RUNNERS[args.worker](args, clock)
    windows = clock.windows(args.warmup_steps, args.steps_per_window)
    if len(windows) != args.windows:
        raise RuntimeError(f"{args.worker}: measured {len(windows)} windows, expected {args.windows}")
    result = {
        "windows_s": windows,
        "times": clock.times,
        "batch_shape": clock.batch_shape,
        "batches": clock.batches,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_mb": sum(
            t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        ) / 2**20,
        "start_rss_mb": start_rss_mb,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "gradients_mb": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20,
    }
    Path(args.result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# The orchestrator: rounds of subprocesses, then the table


def resident_mb() -> float:
    """This process's resident memory now (Linux ``/proc``), in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot, over all cores (``/proc/stat``)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_busy_s() -> float:
    """CPU seconds used by this process and its finished subprocesses (the configurations)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def load_start() -> tuple[float, tuple[float, float, float]]:
    """The 1-minute load average now, and the clocks :func:`load_since` measures the others' cores from."""
    return loadavg(), (time.monotonic(), machine_busy_s(), own_busy_s())


def load_since(start: tuple[float, tuple[float, float, float]]) -> tuple[float, float, float]:
    """The machine's load over a run that began at ``start`` (:func:`load_start`): the 1-minute load
    average at the start and now (which counts the run's own threads), and the average number of
    cores other processes (not this one, nor its finished subprocesses) kept busy meanwhile."""
    load, clocks = start
    wall, machine, own = (now - then for now, then in zip((time.monotonic(), machine_busy_s(), own_busy_s()), clocks))
    return load, loadavg(), max(0.0, machine - own) / wall


def wait_for_quiet(threshold: float, timeout_s: float, poll_s: float = 30.0) -> None:
    """Block until the 1-minute load average is below ``threshold`` (timings on a busy machine lie)."""
    deadline = time.monotonic() + timeout_s
    while (load := loadavg()) >= threshold:
        if time.monotonic() > deadline:
            raise SystemExit(f"load average still {load:.2f} >= {threshold} after {timeout_s:.0f} s; not measuring")
        print(f"waiting for a quiet machine: load average {load:.2f} >= {threshold}", file=sys.stderr, flush=True)
        time.sleep(poll_s)


WORKER_OPTIONS = ("preset", "device", "dtype", "threads", "warmup_steps", "windows", "steps_per_window", "lengths",
                  "checkpointing")


class WorkerFailed(RuntimeError):
    """A configuration's process failed, or ran past the time left of ``--time-limit``."""


def run_worker(name: str, args, result_file: Path, timeout_s: float | None = None) -> dict:
    options = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKER_OPTIONS]
    command = [sys.executable, __file__, "--worker", name, f"--workdir={args.workdir}", f"--result-file={result_file}",
               *options]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"configuration {name} ran past --time-limit ({timeout_s:.0f} s were left)") from None
    if done.returncode != 0:
        raise WorkerFailed(f"configuration {name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def run_rounds(names: list[str], args) -> tuple[dict[str, list[dict]], tuple[float, float, float]]:
    """Run every configuration once per round, in an order rotated by the round, after the
    round's matmul-peak measurement (results under ``"matmul"``).

    With ``--time-limit`` (a budgeted run, such as ``gpu_all.py``'s) no configuration starts after
    ``args.deadline`` and a running one is stopped there. In a budgeted run, and for an optional
    configuration (``OPTIONAL_CONFIGS``) always, a configuration that fails goes into ``args.skipped``
    with the reason and keeps the rounds it finished (none: no row); otherwise a failure stops the
    benchmark.

    Returns each configuration's results and the machine's load: the 1-minute load average at
    the start and the end (which counts this benchmark's own threads) and the average number of
    cores that other processes kept busy meanwhile.
    """
    start = load_start()
    results: dict[str, list[dict]] = {n: [] for n in ["matmul", *names]}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: matmul peak", file=sys.stderr, flush=True)
        results["matmul"].append(run_worker("matmul", args, args.workdir / f"matmul-{r}.json"))
        for name in names[r % len(names):] + names[: r % len(names)]:
            left = args.deadline - time.monotonic()
            if name in args.skipped:
                continue
            if left <= 0:
                args.skipped[name] = f"not started in round {r + 1}: --time-limit {args.time_limit:.0f} s reached"
                continue
            print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            try:
                results[name].append(run_worker(name, args, args.workdir / f"{name}-{r}.json",
                                                timeout_s=None if math.isinf(left) else left))
            except WorkerFailed as failure:
                if args.time_limit is None and name not in OPTIONAL_CONFIGS:
                    raise
                lines = str(failure).strip().splitlines()
                args.skipped[name] = lines[0] + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")
                print(f"skipped {name}: {failure}", file=sys.stderr, flush=True)
    return results, load_since(start)


@dataclass
class Row:
    name: str
    step_s: float  # fixed lengths: median window / steps per window; real: timed time / timed steps
    pairs_per_s: float
    tokens_per_s: float  # tokens processed (padding included)
    useful_tokens_per_s: float  # non-padding tokens
    padding: float  # share of the processed tokens that are padding, over the timed steps
    peak_mb: float  # peak RSS, or peak GPU memory allocated on CUDA
    trainable_params: int  # parameters that get gradients (LoRA: adapters and reward head)
    optimizer_state_mb: float  # AdamW's moments (and step counters) after training
    floor_mb: float = math.nan  # what no step can go below: the process before its model, weights, gradients, optimizer state
    tflops: float = math.nan  # matmul TFLOP/s the steps achieved (step_flops)
    peak_fraction: float = math.nan  # tflops / the machine's matmul peak in the run's dtype
    speedup: float = math.nan  # pairs/s relative to TRL DPO
    memory_ratio: float = math.nan  # peak memory relative to TRL DPO


def check_same_work(results: dict[str, list[dict]], args) -> None:
    """Fixed lengths: every configuration's first batch has the same shape and response tokens.
    Real lengths: every configuration trained one epoch over the same pairs, i.e. the same number
    of pairs and the same useful (non-padding) and response tokens, however they were batched."""
    if args.lengths == "fixed":
        shapes = {name: runs[0]["batch_shape"] for name, runs in results.items()}
        if len({tuple(s) for s in shapes.values()}) != 1:
            raise RuntimeError(f"configurations trained on different batch shapes: {shapes}")
        return
    totals = {name: (sum(b[0] for b in run["batches"]) // 2, sum(b[3] for b in run["batches"]),
                     sum(b[2] for b in run["batches"])) for name, runs in results.items() for run in runs[:1]}
    if len(set(totals.values())) != 1:
        raise RuntimeError(f"configurations trained on different work (pairs, useful tokens, response tokens): {totals}")


def run_rates(name: str, run: dict, args) -> dict[str, float]:
    """One run's rates over its timed steps (after ``--warmup-steps``): seconds per step, pairs,
    processed and useful tokens and matmul FLOPs per second, and the padding share."""
    preset, warm = PRESETS[args.preset], args.warmup_steps
    batches = run["batches"][warm:total_steps(args)]
    seconds = run["times"][warm + len(batches)] - run["times"][warm]
    processed = sum(b[4] * b[5] for b in batches)  # the slots the model computes on: padded or packed rows
    return {"step_s": seconds / len(batches), "pairs_per_s": sum(b[0] for b in batches) / 2 / seconds,
            "tokens_per_s": processed / seconds, "useful_tokens_per_s": sum(b[3] for b in batches) / seconds,
            "padding": 1 - sum(b[3] for b in batches) / processed,
            "flops_per_s": sum(step_flops(preset, name, b, args.device, args.checkpointing) for b in batches) / seconds}


def summarize(results: dict[str, list[dict]], args) -> list[Row]:
    peaks = results.pop("matmul")
    args.matmul = {dtype: {k: max(run[dtype][k] for run in peaks) for k in peaks[0][dtype]} for dtype in peaks[0]}
    peak = args.matmul[args.dtype]["peak"]
    preset = PRESETS[args.preset]
    results = {name: runs for name, runs in results.items() if runs}  # a skipped configuration has none
    if BASELINE not in results:
        raise SystemExit(f"the baseline {BASELINE} has no result ({args.skipped.get(BASELINE)}): no ratio to report")
    check_same_work(results, args)
    rows = []
    for name, runs in results.items():
        rates = [run_rates(name, run, args) for run in runs]
        median = {key: statistics.median(r[key] for r in rates) for key in rates[0]}
        if args.lengths == "fixed":  # as before: the median window, and the batch shape's tokens
            sequences, length, _ = runs[0]["batch_shape"]
            step = statistics.median(w for run in runs for w in run["windows_s"]) / args.steps_per_window
            flops = step_flops(preset, name, runs[0]["batches"][0], args.device, args.checkpointing)
            median |= {"step_s": step, "pairs_per_s": preset.pairs / step, "tokens_per_s": sequences * length / step,
                       "useful_tokens_per_s": sequences * length / step, "flops_per_s": flops / step}
        memory = max(run["peak_gpu_mb"] if args.device == "cuda" else run["peak_rss_mb"] for run in runs)
        first = runs[0]
        floor = first["weights_mb"] + first["gradients_mb"] + first["optimizer_state_mb"]
        floor += 0.0 if args.device == "cuda" else min(run["start_rss_mb"] for run in runs)
        rows.append(Row(name, median["step_s"], median["pairs_per_s"], median["tokens_per_s"],
                        median["useful_tokens_per_s"], median["padding"], memory, first["trainable_params"],
                        first["optimizer_state_mb"], floor, median["flops_per_s"] / 1e12, median["flops_per_s"] / peak))
    base = next(r for r in rows if r.name == BASELINE)
    for r in rows:
        r.speedup, r.memory_ratio = r.pairs_per_s / base.pairs_per_s, r.peak_mb / base.peak_mb
    return rows


# Our throughput targets on CPU: (row, quantity, comparison, bound); "report" is shown, never judged.
TARGETS = [
    ("drdo", "speedup", ">=", 1.4),
    ("dpo_precomputed", "speedup", ">=", 1.3),
    ("dpo_live", "speedup", ">=", 1.0),
    ("drdo", "memory_ratio", "<=", 0.8),
    ("drdo", "peak_fraction", "report", None),
    ("trl_dpo", "peak_fraction", "report", None),
]
# At Llama-3's vocabulary the head's logits decide memory: the chunked head's targets.
TARGETS_BY_PRESET = {"vocab128k": [
    ("drdo", "speedup", ">=", 3.0),
    ("drdo", "memory_ratio", "<=", 0.35),
    ("drdo_one_piece", "memory_ratio", "report", None),
]}
# With --lengths real --packed: packed batches against today's answer to padding, length groups.
PACKED_TARGETS = [
    ("drdo_packed", "useful_vs_grouped", ">=", 1.3),
    ("drdo_packed", "padding", "<=", 0.05),
]


def target_value(by_name: dict[str, Row], name: str, quantity: str) -> float:
    """A row's figure for a target; ``useful_vs_grouped`` is its useful tokens/s over DRDO's length-grouped row's."""
    if quantity == "useful_vs_grouped":
        return by_name[name].useful_tokens_per_s / by_name["drdo_grouped"].useful_tokens_per_s
    return getattr(by_name[name], quantity)


def what_it_takes(row: Row, quantity: str, bound: float, value: float, baseline: Row) -> str:
    """For a missed target, what meeting it would take, from the run's own figures.

    A throughput ratio is ``(share of peak / FLOPs per unit of work)`` over the other row's, so at
    this row's FLOPs meeting ``bound`` takes ``bound / value`` times the share of the matmul peak it
    ran at. A peak memory ratio cannot go below the row's floor: the process before its model,
    plus the weights, their gradients and the optimizer state.
    """
    if quantity in ("speedup", "useful_vs_grouped"):
        return f"at this row's FLOPs it takes {bound / value * row.peak_fraction:.0%} of the matmul peak; it ran at {row.peak_fraction:.0%}"
    if quantity == "memory_ratio":
        return (f"the process, weights, gradients and optimizer state alone take {row.floor_mb:.0f} MiB, "
                f"{row.floor_mb / baseline.peak_mb:.2f}x TRL's peak")
    return ""


def report(rows: list[Row], args, loads: tuple[float, float, float]) -> str:
    p = PRESETS[args.preset]
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    if args.lengths == "fixed":
        data = f"{p.pairs} pairs/batch of {p.prompt}+{p.response} tokens"
    else:
        data = (f"{p.pairs} pairs/batch, one epoch of {p.pairs * total_steps(args)} pairs with long-tailed lengths "
                f"(prompt <= {p.prompt}, responses <= {p.response} tokens)")
    anchors = "; ".join(f"{dtype} {v['peak'] / 1e12:.3f} TFLOP/s (square {v['square'] / 1e12:.3f}, MLP shape "
                        f"{v['mlp'] / 1e12:.3f})" for dtype, v in args.matmul.items())
    lines = [
        f"preset {args.preset}: Llama hidden {p.hidden}, {p.layers} layers, {p.heads} heads, MLP {p.intermediate}, "
        f"vocab {p.vocab}, {args.parameters / 1e6:.1f}M parameters; {data}",
        f"device {args.device}, {args.dtype}, {args.threads} threads; {args.rounds} rounds x {args.windows} windows x "
        f"{args.steps_per_window} steps after {args.warmup_steps} warm-up steps; "
        f"load average {loads[0]:.2f} at start, {loads[1]:.2f} at end (with this benchmark's threads); "
        f"other processes used {loads[2]:.2f} cores on average during the run",
        f"matmul peak (best GEMM at {args.threads} threads): {anchors}; % of peak is against {args.dtype}",
        "",
        f"| configuration | step ms | pairs/s | tokens/s | useful tokens/s | padding | {memory} | pairs/s vs TRL "
        "| memory vs TRL | matmul TFLOP/s | % of peak | trained parameters | optimizer state MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {ALL_CONFIGS[r.name]} | {r.step_s * 1e3:.0f} | {r.pairs_per_s:.2f} | {r.tokens_per_s:.0f} | "
                     f"{r.useful_tokens_per_s:.0f} | {r.padding:.1%} | {r.peak_mb:.0f} | {r.speedup:.2f}x | "
                     f"{r.memory_ratio:.2f}x | {r.tflops:.3f} | {r.peak_fraction:.1%} | "
                     f"{r.trainable_params:,} | {r.optimizer_state_mb:.1f} |")
    lines += [f"skipped {ALL_CONFIGS[name]}: {reason}" for name, reason in args.skipped.items()]
    if args.device != "cpu":
        return "\n".join(lines)  # the targets are for the CPU comparison
    lines.append("")
    by_name = {r.name: r for r in rows}
    targets = TARGETS_BY_PRESET.get(args.preset, TARGETS)
    if {"drdo_packed", "drdo_grouped"} <= set(by_name):
        targets = [*targets, *PACKED_TARGETS]
    for name, quantity, op, bound in targets:
        if name not in by_name:  # not run (--only)
            continue
        value = target_value(by_name, name, quantity)
        if op == "report":
            shown = f"{value:.1%}" if quantity == "peak_fraction" else f"{value:.2f}"
            lines.append(f"report {ALL_CONFIGS[name]}: {quantity} {shown} (no target)")
            continue
        met = value >= bound if op == ">=" else value <= bound
        line = f"target {ALL_CONFIGS[name]}: {quantity} {value:.2f} {op} {bound}: {'met' if met else 'MISSED'}"
        takes = "" if met else what_it_takes(by_name[name], quantity, bound, value, by_name[BASELINE])
        lines.append(f"{line} ({takes})" if takes else line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: mixed precision (autocast)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads in every process")
    parser.add_argument("--rounds", type=int, default=3, help="subprocess rounds; each runs every configuration once")
    parser.add_argument("--windows", type=int, default=2, help="measured windows per configuration per round")
    parser.add_argument("--steps-per-window", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--lengths", choices=["fixed", "real"], default="fixed",
                        help="fixed: no padding; real: long-tailed lengths, one epoch, each trainer also length-grouped")
    parser.add_argument("--only", nargs="+", choices=[*CONFIGS, *EXTRA_CONFIGS], default=list(CONFIGS),
                        help="run a subset (the baseline is always included)")
    parser.add_argument("--no-grouped", dest="grouped", action="store_false",
                        help="with --lengths real: skip the length-grouped twins")
    parser.add_argument("--packed", action="store_true",
                        help="with --lengths real: also run our trainers on packed batches (and packed + grouped)")
    parser.add_argument("--lora", action="store_true", help="also run each chosen trainer with LoRA adapters (LORA)")
    parser.add_argument("--checkpointing", type=lambda v: v == "True", nargs="?", const=True, default=False,
                        help="gradient checkpointing in every configuration (TRL's default; off here by default)")
    parser.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                        help="first wait (up to --wait-timeout s) until the 1-minute load average is below LOAD")
    parser.add_argument("--wait-timeout", type=float, default=2400.0)
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no configuration after this many seconds (from the start, set-up included), stop a "
                             "running one there, and report every failure instead of stopping (those left out are listed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and settings here")
    # Internal: run one configuration (the orchestrator starts these).
    parser.add_argument("--worker", choices=[*ALL_CONFIGS, "matmul"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    # The time limit counts from here: preparing the model (a minute at 1B parameters) is part of it.
    args.deadline = math.inf if args.time_limit is None else time.monotonic() + args.time_limit
    if args.worker:
        worker(args)
        return []
    if args.dtype == "bf16" and args.device == "cpu":
        raise SystemExit("--dtype bf16 is for --device cuda; the CPU comparison is fp32")
    names = [n for n in [*CONFIGS, *EXTRA_CONFIGS] if n in {*args.only, BASELINE}]
    if args.lora:
        names += [f"{n}_lora" for n in names if f"{n}_lora" in LORA_CONFIGS]
    if args.lengths == "real" and args.grouped:
        names = [variant for n in names for variant in (n, f"{n}{GROUPED}")]
    if args.lengths == "real" and args.packed:
        names = [variant for n in names for variant in (n, f"{n}{PACKED}") if variant in ALL_CONFIGS]
    if args.wait_for_load is not None:
        wait_for_quiet(args.wait_for_load, args.wait_timeout)
    preset = PRESETS[args.preset]
    args.skipped = {}
    with tempfile.TemporaryDirectory(prefix="drdo-bench-") as tmp:
        args.workdir = Path(tmp)
        args.parameters = prepare(preset, preset.pairs * total_steps(args), args.workdir, lengths=args.lengths)
        results, loads = run_rounds(names, args)
    rows = summarize(results, args)
    print(report(rows, args, loads))
    if args.json is not None:
        settings = {k: str(v) for k, v in vars(args).items()
                    if k not in ("worker", "workdir", "result_file", "matmul", "skipped", "deadline")}
        load = dict(zip(("average_at_start", "average_at_end", "other_processes_cores"), loads))
        summary = {"settings": settings, "load": load, "matmul_peak_flops": args.matmul, "rows": [asdict(r) for r in rows],
                   "skipped": args.skipped, "raw": results}
        args.json.write_text(json.dumps(summary, indent=1))
    return rows


if __name__ == "__main__":
    main()
