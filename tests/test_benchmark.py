"""The throughput benchmark (``benchmarks/train_throughput.py``) and the performance paths it measures.

The benchmark runs end to end at a tiny size and must produce every row with finite, positive
numbers; timings are for the benchmark itself, never asserted here. The response-only log-prob
path that our modules train with must compute what the plain full-logits path computes, and
length-grouped batching must pad less while keeping every pair and resuming in place.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drdo_lightning import CausalLMWithRewardHead, PreferenceDataModule, logprobs
from drdo_lightning.data.sampling import group_by_length, padding_fraction
from drdo_lightning.heads import Wanted, sequence_values

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def load_benchmark(script: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_produces_every_row(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--rounds", "1", "--windows", "2",
               "--steps-per-window", "1", "--warmup-steps", "1", "--lora", "--json", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    bench = load_benchmark()
    configs = bench.ALL_CONFIGS
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    # TRL DPO, DRDO, DPO precomputed, DPO live; then the four trainers with LoRA.
    assert list(rows) == [*bench.CONFIGS, *bench.LORA_CONFIGS]
    for name, row in rows.items():
        for key in ("step_s", "pairs_per_s", "tokens_per_s", "useful_tokens_per_s", "peak_mb", "speedup",
                    "memory_ratio", "tflops", "peak_fraction", "trainable_params", "optimizer_state_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        # AdamW keeps two float32 moments per trained parameter (and a step count per tensor).
        assert row["optimizer_state_mb"] * 2**20 >= 8 * row["trainable_params"], name
        # The floor (the process before its model, weights, gradients, optimizer state) is under the peak it bounds.
        assert row["optimizer_state_mb"] < row["floor_mb"] < row["peak_mb"], name
        assert f"| {configs[name]} |" in proc.stdout
    for name in bench.LORA_CONFIGS:  # LoRA trains, and keeps optimizer state for, a fraction of the model
        full = rows[name.removesuffix("_lora")]
        assert rows[name]["trainable_params"] < full["trainable_params"] / 2, name
        assert rows[name]["optimizer_state_mb"] < full["optimizer_state_mb"] / 2, name
    assert "load average" in proc.stdout and "matmul peak" in proc.stdout


@pytest.mark.slow
def test_smoke_run_with_real_lengths_and_grouping(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--lengths", "real", "--rounds", "1", "--windows", "4",
               "--steps-per-window", "1", "--warmup-steps", "1", "--only", "drdo", "--packed", "--json", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    rows = {row["name"]: row for row in summary["rows"]}
    assert list(rows) == ["trl_dpo", "trl_dpo_grouped", "drdo", "drdo_packed", "drdo_grouped", "drdo_grouped_packed"]
    # Packing is judged against the length-grouped row, in its own target lines.
    ratio = rows["drdo_packed"]["useful_tokens_per_s"] / rows["drdo_grouped"]["useful_tokens_per_s"]
    assert f"target DRDO (ours), packed: useful_vs_grouped {ratio:.2f} >= 1.3" in proc.stdout
    assert rows["drdo_packed"]["padding"] < rows["drdo"]["padding"]
    for name, row in rows.items():
        assert 0 < row["useful_tokens_per_s"] < row["tokens_per_s"], name  # long-tailed lengths: batches pad (packed rows too: a few leftover slots)
        assert 0 < row["padding"] < 1 and 0 < row["peak_fraction"] < 1, name
    # One epoch over the same pairs each (the script checks it too); grouping pads less.
    epochs = {name: sorted(b[3] for b in runs[0]["batches"]) for name, runs in summary["raw"].items()}
    assert len({sum(v) for v in epochs.values()}) == 1
    padded = {name: sum(b[0] * b[1] for b in runs[0]["batches"]) for name, runs in summary["raw"].items()}
    assert padded["drdo_grouped"] <= padded["drdo"] and padded["trl_dpo_grouped"] <= padded["trl_dpo"]


def test_a_missed_target_says_what_meeting_it_would_take():
    bench = load_benchmark()
    trl = bench.Row("trl_dpo", 10.0, 1.0, 1.0, 1.0, 0.0, 1000.0, 10, 1.0, 400.0, peak_fraction=0.45)
    ours = bench.Row("drdo", 5.0, 2.0, 2.0, 2.0, 0.0, 500.0, 10, 1.0, 380.0, peak_fraction=0.6)
    # Twice TRL's pairs/s at 60% of the peak: three times would take 90% at the same FLOPs.
    assert bench.what_it_takes(ours, "speedup", 3.0, 2.0, trl).startswith("at this row's FLOPs it takes 90% of the matmul peak")
    assert "380 MiB, 0.38x TRL's peak" in bench.what_it_takes(ours, "memory_ratio", 0.35, 0.5, trl)
    assert bench.what_it_takes(ours, "padding", 0.05, 0.06, trl) == ""


def test_real_lengths_are_long_tailed_within_the_budget():
    bench = load_benchmark()
    rng = random.Random(0)
    draws = [bench.real_length(rng, 200) for _ in range(20000)]
    assert 1 <= min(draws) and max(draws) == 200  # cut at the budget, and some draws reach it
    median, mean = sorted(draws)[len(draws) // 2], sum(draws) / len(draws)
    assert median == pytest.approx(60, abs=3) and mean > median  # median 30% of the budget, right tail
    assert 0.02 < sum(d == 200 for d in draws) / len(draws) < 0.1
    assert min(bench.real_length(rng, 24, minimum=2) for _ in range(1000)) == 2


def test_step_flops_match_a_hand_count():
    bench = load_benchmark()
    # hidden 4, 1 layer, MLP 6, vocab 10; a batch of 2 rows (1 pair) padded to 3 tokens, 4 response tokens.
    p = bench.Preset(hidden=4, layers=1, heads=1, intermediate=6, vocab=10, tie_embeddings=False, prompt=1,
                     response=2, pairs=1)
    batch = [2, 3, 4, 5]
    # Per token: q, k, v, o = 4 x 16 multiply-adds, MLP 3 x 24 = 72: 136 multiply-adds, 272 FLOPs; 6 tokens.
    linear = 6 * 272
    # Causal attention per row: query i sees i keys (1 + 2 + 3 = 6 pairs), q.k and p.v: 2 x 4 multiply-adds each.
    attention = 2 * 6 * 2 * 2 * 4
    assert bench.forward_flops(p, 2, 3) == (linear, attention)
    head = 2 * 4 * 10  # one position through the 4 x 10 head
    assert bench.head_flops(p, 1) == head
    body = 3 * (linear + attention)  # forward + backward (input and weight gradients)
    # Ours: the head at the 4 response positions (DRDO: plus each row's last token, for the reward head).
    assert bench.step_flops(p, "dpo_precomputed", batch) == body + 3 * 4 * head
    assert bench.step_flops(p, "drdo", batch) == body + 3 * 6 * head
    assert bench.step_flops(p, "drdo_grouped", batch) == body + 3 * 6 * head
    # Live reference: one more forward of the body and of the head at the same positions.
    assert bench.step_flops(p, "dpo_live", batch) == body + 3 * 4 * head + linear + attention + 4 * head
    # TRL on CPU: the head at every position but each row's last (2 x 2), recomputed in backward (4 forwards);
    # its live reference likewise; on CUDA (Triton) only at the response positions.
    assert bench.step_flops(p, "trl_dpo", batch) == body + 4 * 4 * head + linear + attention + 4 * head
    assert bench.step_flops(p, "trl_dpo", batch, device="cuda") == body + 4 * 4 * head + linear + attention + 4 * head
    wide = [2, 5, 4, 8]  # padded to 5: TRL's CPU head covers 2 x 4 positions, ours still 4
    lin5, att5 = bench.forward_flops(p, 2, 5)
    assert bench.step_flops(p, "trl_dpo", wide) == 3 * (lin5 + att5) + 4 * 8 * head + lin5 + att5 + 8 * head
    # LoRA: frozen linear weights get no gradient (2 forwards), attention still 3; TRL's head 3 (no weight grad).
    assert bench.step_flops(p, "dpo_precomputed_lora", batch) == 2 * linear + 3 * attention + 2 * 4 * head
    assert bench.step_flops(p, "trl_dpo_lora", batch) == (2 * linear + 3 * attention + 3 * 4 * head
                                                          + linear + attention + 4 * head)
    # Gradient checkpointing: the backward recomputes the body's forward, on either side.
    assert bench.step_flops(p, "drdo", batch, checkpointing=True) == body + linear + attention + 3 * 6 * head
    assert bench.step_flops(p, "trl_dpo", batch, checkpointing=True) == (body + linear + attention + 4 * 4 * head
                                                                         + linear + attention + 4 * head)


def test_matmul_peak_measures_positive_flops():
    torch.set_num_threads(1)
    peaks = load_benchmark().matmul_peak(load_benchmark().PRESETS["tiny"], "cpu", "fp32", repeats=1)
    assert set(peaks) == {"square", "mlp", "peak"} and peaks["peak"] == max(peaks["square"], peaks["mlp"]) > 0


def test_word_tokenizer_round_trips_the_ids_it_was_written_from():
    tokenizer = load_benchmark().build_tokenizer(64)
    ids = tokenizer("t5 t0 t60", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["t5", "t0", "t60"]
    # TRL appends the EOS text to each response before tokenizing: it must stay one token.
    assert tokenizer(" t1 t2</s>", add_special_tokens=False)["input_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("average", [False, True])
def test_response_only_logps_match_the_full_logits_path(tiny_lm, padded_responses, side, average):
    torch.manual_seed(0)
    model = CausalLMWithRewardHead(copy.deepcopy(tiny_lm), CausalLMWithRewardHead.new_reward_head(32)).train()
    ids, mask, labels = padded_responses(side)

    def outputs_and_grads(compute):
        model.zero_grad(set_to_none=True)
        logps, rewards = compute()
        (logps.sum() + rewards.sum()).backward()
        return logps.detach(), rewards.detach(), [p.grad.clone() for p in model.parameters()]

    def full_logits():
        out = model(ids, mask)
        return logprobs.sequence_logps(out.logits, labels, average=average), out.rewards

    lean = outputs_and_grads(lambda: sequence_values(model, ids, mask, labels, Wanted(average=average))[:2])
    plain = outputs_and_grads(full_logits)
    torch.testing.assert_close(lean[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean[1], plain[1])
    for got, want in zip(lean[2], plain[2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# -- padding: length-grouped batches and the reported padding fraction -------------------


def test_padding_fraction_hand_computed():
    # Two batches of two pairs (prompt+chosen, prompt+rejected): each batch pads to its longest sequence.
    lengths = [(4, 2), (3, 3), (1, 1), (2, 1)]
    real = 4 + 2 + 3 + 3 + 1 + 1 + 2 + 1
    built = 4 * 4 + 2 * 4  # batch 1 pads to 4, batch 2 to 2; four sequences each
    assert padding_fraction(lengths, [0, 1, 2, 3], batch_size=2) == pytest.approx(1 - real / built)


def test_group_by_length_batches_similar_lengths_and_keeps_every_index():
    lengths = [(i * 7919) % 101 for i in range(203)]  # scrambled lengths
    order = list(range(203))
    random.Random(0).shuffle(order)
    grouped = group_by_length(order, lengths, batch_size=8, seed=1, window=5)
    assert sorted(grouped) == sorted(order)
    assert grouped == group_by_length(order, lengths, batch_size=8, seed=1, window=5)  # seeded
    assert grouped[-3:] == sorted(order[200:], key=lengths.__getitem__)  # the short batch stays last
    pairs = [(n, n) for n in lengths]
    assert padding_fraction(pairs, grouped, 8) < padding_fraction(pairs, order, 8) / 3


def test_data_module_groups_training_batches_by_length(pair_files, tiny_model_dir, caplog):
    fractions = {}
    for grouped in (False, True):
        data = PreferenceDataModule(str(pair_files["train"]), tokenizer=str(tiny_model_dir), batch_size=8,
                                    cache_dir=None, group_by_length=grouped)
        data.setup("fit")
        with caplog.at_level(logging.INFO, logger="drdo_lightning.data"):
            loader = data.train_dataloader()
        fractions[grouped] = float(caplog.records[-1].getMessage().split("%")[0].split()[-1])
        seen = [row for batch in loader for row in batch["chosen_input_ids"].tolist()]
        assert len(seen) == len(data.train_dataset)  # every pair once per epoch
        # A resumed pass starts inside the same grouped order.
        loader.sampler.start = 8
        assert list(loader.sampler) == loader.sampler.order()[8:]
    assert fractions[True] < fractions[False]


def test_gradient_weights_script_reads_each_pairs_log_probs(tiny_model_dir, pair_files):
    script = load_benchmark(ROOT / "benchmarks" / "drdo_gradient_weights.py")
    zw, zl = script.response_logps(str(tiny_model_dir), str(pair_files["train"]), pairs=5, max_prompt_length=64,
                                   max_length=128, batch_size=4)
    assert zw.shape == zl.shape == (5,) and (zw < 0).all() and (zl < 0).all() and not torch.equal(zw, zl)
    # Hand-computed: p_w = 1/2 at z_w = z_l = -20 gives push-down alpha (1/2)^2 * gamma * (1/2) * 20 = 0.5
    # and push-up 0.5 + alpha/4; a pair already ranked right (p_w ~ 1) gets neither.
    up, down = script.gradient_weights(torch.tensor([-20.0, -1.0]), torch.tensor([-20.0, -30.0]), alpha=0.1, gamma=2.0)
    assert down[0].item() == pytest.approx(0.5, rel=1e-6) and up[0].item() == pytest.approx(0.525, rel=1e-6)
    assert up[1].item() < 1e-20 and down[1].item() < 1e-20
