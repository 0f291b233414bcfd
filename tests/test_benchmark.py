"""The throughput benchmark (``benchmarks/train_throughput.py``) and the performance paths it measures.

The benchmark runs end to end at a tiny size and must produce every row with finite, positive
numbers; timings are for the benchmark itself, never asserted here. The response-only log-prob
path that our modules train with must compute what the plain full-logits path computes, and
length-grouped batching must pad less while keeping every pair and resuming in place.

The GPU run (``benchmarks/gpu_all.py``: ``gpu_checks.py``, then the ``llama3-1b`` preset) is prepared
here without a GPU: the checks' ``--dry-run`` passes on CPU and fails a broken fused head; the run's
parts fit its time budget and its dry run runs the same parts; the default LM head is chosen per
device in one place (``heads.HEAD_DEFAULTS``), the CPU's as measured.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import random
import sys
from pathlib import Path

import progress
import pytest
import torch

import drdo_lightning.heads as heads
from drdo_lightning import DRDO, CausalLMWithRewardHead, PreferenceDataModule, logprobs
from drdo_lightning.data.sampling import group_by_length, padding_fraction
from drdo_lightning.heads import HeadDefault, Wanted, sequence_values

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"
CHECKS = ROOT / "benchmarks" / "gpu_checks.py"
ONLINE_STEP = ROOT / "benchmarks" / "online_step.py"


def load_benchmark(script: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# One row of each kind of run: TRL's, ours without a reference, with a precomputed and with a live one
# (SimPO's and ORPO's rows run as DRDO's does, through the same worker).
SMOKE_ROWS = ["drdo", "dpo_precomputed", "dpo_live"]


@pytest.mark.slow
def test_smoke_run_produces_a_row_of_each_kind(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--rounds", "1", "--windows", "2",
               "--steps-per-window", "1", "--warmup-steps", "1", "--lora", "--only", *SMOKE_ROWS, "--json", str(out)]
    proc = progress.run(command, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    bench = load_benchmark()
    configs = bench.ALL_CONFIGS
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    # TRL DPO (the baseline, always run), then the named rows; then the same trainers with LoRA.
    assert list(rows) == [bench.BASELINE, *SMOKE_ROWS, *(f"{name}_lora" for name in [bench.BASELINE, *SMOKE_ROWS])]
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
    proc = progress.run(command, cwd=ROOT)
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


@pytest.mark.slow
def test_online_step_smoke_run_produces_an_online_and_an_offline_row(tmp_path):
    """``benchmarks/online_step.py``: one window of one step of DRDO offline and online, at 2 pairs per step
    (the DPO rows run through the same worker)."""
    out = tmp_path / "online.json"
    command = [sys.executable, str(ONLINE_STEP), "--rounds", "1", "--windows", "1", "--steps-per-window", "1",
               "--warmup-steps", "0", "--pairs", "2", "--k", "2", "--max-new-tokens", "8", "--threads", "1",
               "--only", "drdo", "online_drdo", "--json", str(out)]
    proc = progress.run(command, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    script = load_benchmark(ONLINE_STEP)
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["drdo", "online_drdo_k2_t8"]
    for name, row in rows.items():
        online = name.startswith("online")
        numbers = ["step_s", "pairs_per_s", "peak_mb", "weights_mb"] + (["samples_per_s", "response_tokens"] if online else [])
        for key in numbers:
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert 0 < row["pairs_per_step"] <= 2, name  # a prompt whose 2 scores tie gives no pair
        shares = [row[phase] for phase in script.PHASES]
        assert all(0 <= share <= 1 for share in shares) and 0 < row["training"] and sum(shares) <= 1 + 1e-9, (name, shares)
        assert row["other"] == pytest.approx(1 - sum(shares), abs=1e-9)
        # Only the online step samples, scores and estimates the KL; it holds the Oracle (and a starting policy) too.
        assert (row["sampling"] > 0 and row["scoring"] > 0 and row["kl"] > 0) == online, (name, shares)
        if online:
            assert row["samples_per_s"] == pytest.approx(2 * 2 / row["step_s"])  # 2 prompts x k=2 per step
            assert 0 < row["response_tokens"] <= 8
            assert row["weights_mb"] > 2 * rows["drdo"]["weights_mb"], name
        assert f"| {script.CONFIGS[name.split('_k')[0]]}" in proc.stdout
    assert "load average" in proc.stdout


def test_online_step_windows_hold_the_phases_timed_within_them(monkeypatch):
    script = load_benchmark(ONLINE_STEP)
    now = iter([0.0, 1.0, 3.0, 3.5, 5.0, 5.5])
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(now))
    phases = script.PhaseClock(sync=lambda: None)
    phases.mark(step_ended=False)  # the step clock's tick at 0.0
    phases.timed("sampling", lambda: None)()  # 0.0 to 1.0
    phases.start("training")  # 3.0 to 3.5
    phases.stop("training")
    phases.mark(step_ended=True)  # tick at 4.0
    phases.timed("scoring", lambda: None)()  # 5.0 to 5.5
    phases.mark(step_ended=True)  # tick at 6.0
    times = [0.0, 4.0, 6.0]
    first = {"seconds": 4.0, "sampling": 1.0, "scoring": 0.0, "kl": 0.0, "training": 0.5}
    second = {"seconds": 2.0, "sampling": 0.0, "scoring": 0.5, "kl": 0.0, "training": 0.0}
    assert script.window_phases(times, phases.marks, warmup=0, steps_per_window=1) == [first, second]
    assert script.window_phases(times, phases.marks, warmup=1, steps_per_window=1) == [second]
    assert script.window_phases(times, phases.marks, warmup=0, steps_per_window=2) == [
        {"seconds": 6.0, "sampling": 1.0, "scoring": 0.5, "kl": 0.0, "training": 0.5}]
    assert len(phases.steps) == 2


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
    p = bench.Preset(hidden=4, layers=1, heads=1, kv_heads=1, intermediate=6, vocab=10, tie_embeddings=False,
                     prompt=1, response=2, pairs=1)
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
    # TRL's Liger option fuses norms, activations and rotary embeddings: the same matmuls as TRL's.
    assert bench.step_flops(p, "trl_dpo_liger", batch, "cuda", True) == bench.step_flops(p, "trl_dpo", batch, "cuda", True)
    # Grouped-query attention: 2 query heads share 1 key/value head, so k and v project onto h/2 = 2:
    # per token q, o 2 x 16, k, v 2 x 8, MLP 72 multiply-adds: 120, 240 FLOPs; attention as before.
    gqa = bench.Preset(hidden=4, layers=1, heads=2, kv_heads=1, intermediate=6, vocab=10, tie_embeddings=False,
                       prompt=1, response=2, pairs=1)
    assert bench.forward_flops(gqa, 2, 3) == (6 * 240, attention)


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


# -- the GPU run, prepared without a GPU -------------------------------------------------


@pytest.mark.slow
def test_gpu_checks_dry_run_passes_every_check_on_cpu(tmp_path):
    out = tmp_path / "checks.json"
    proc = progress.run([sys.executable, str(CHECKS), "--dry-run", "--json", str(out)], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    script = load_benchmark(CHECKS)
    steps = {f"step/{o}/{a}/{p}" for o in script.OBJECTIVES for a in script.STEP_ARCHITECTURES for p in ("fp32", "bf16")}
    packed = {f"packed/sdpa/{a}/fp32" for a in script.PACKED_ARCHITECTURES}
    flash = {f"packed/flash_attention_2/{a}" for a in script.PACKED_ARCHITECTURES}  # CUDA only
    sharded = {"deepspeed/deepspeed_zero2", "deepspeed/deepspeed_zero3", "export/deepspeed_zero3"}
    assert set(checks) == steps | packed | flash | sharded
    for name, check in checks.items():
        assert check["status"] == ("SKIP" if name in flash else "PASS"), check
        if check["status"] == "PASS":
            assert 0 <= check["measured"] <= check["tolerance"], check
        assert f"{check['status']} {name}" in proc.stdout
    # The fused head ran, over several chunks, wherever the head fuses; never on Gemma-2's soft-capped one.
    for name in steps:
        assert ("not fused" in checks[name]["detail"]) == ("/gemma2/" in name), checks[name]
    assert "36 pass, 0 fail, 3 skip" in proc.stdout


def test_gpu_checks_fail_a_fused_head_that_is_slightly_wrong(tmp_path, monkeypatch):
    """A fused head 2% off in its hidden states fails the step check in fp32 and in bf16."""
    script = load_benchmark(CHECKS)
    monkeypatch.setattr(script, "STEP_ARCHITECTURES", ("llama",))
    monkeypatch.setattr(script, "OBJECTIVES", {"drdo": script.OBJECTIVES["drdo"]})
    right = script.step_checks(script.SIZES["cpu"], "cpu", tmp_path / "right")
    assert [c.status for c in right] == ["PASS", "PASS"], right
    fused_head_loss = heads.logprobs.fused_head_loss
    monkeypatch.setattr(heads.logprobs, "fused_head_loss", lambda hidden, *rest: fused_head_loss(hidden * 1.02, *rest))
    wrong = script.step_checks(script.SIZES["cpu"], "cpu", tmp_path / "wrong")
    assert [(c.name, c.status) for c in wrong] == [("step/drdo/llama/fp32", "FAIL"), ("step/drdo/llama/bf16", "FAIL")]
    assert all(c.measured > c.tolerance for c in wrong)


def test_the_gpu_run_fits_its_budget_and_its_dry_run_runs_the_same_parts(tmp_path):
    script = load_benchmark(ROOT / "benchmarks" / "gpu_all.py")
    gpu, dry = script.parts(False, tmp_path), script.parts(True, tmp_path)
    default = [gpu[name] for name in script.DEFAULT_PARTS]
    assert [p.name for p in default] == ["checks", "llama3"]
    # Under 9 minutes: the default parts' caps within the budget, and a minute left for installing the wheels.
    assert sum(p.cap_s for p in default) <= script.BUDGET_S <= 9 * 60 - 60
    llama3 = gpu["llama3"].command
    for flag in ("--checkpointing", "cuda", "bf16", "llama3-1b", "trl_dpo_liger", "dpo_live", "dpo_precomputed",
                 "drdo_one_piece", "drdo"):
        assert flag in llama3, flag
    assert float(llama3[llama3.index("--time-limit") + 1]) < gpu["llama3"].cap_s  # rows left out, the part kept

    def kept(command: list[str]) -> list[str]:
        """The command without what the dry run changes: device, precision, preset, step counts, --dry-run."""
        out, values = [], iter(command[1:])
        for arg in values:
            if arg in ("--device", "--dtype", "--preset", "--rounds", "--warmup-steps", "--windows", "--steps-per-window",
                       "--threads", "--fit-timeout", "--time-limit"):
                next(values)
            elif arg != "--dry-run":
                out.append(arg)
        return out

    assert all(kept(dry[name].command) == kept(gpu[name].command) for name in gpu)
    assert all(dry[name].cap_s == script.DRY_RUN_SLOWER * gpu[name].cap_s for name in gpu)  # a CPU's limits
    assert "--dry-run" in dry["checks"].command and "tiny" in dry["llama3"].command and "cpu" in dry["llama3"].command


def test_the_gpu_run_prints_the_checks_then_one_table(tmp_path):
    script = load_benchmark(ROOT / "benchmarks" / "gpu_all.py")
    listed = [p for name, p in script.parts(False, tmp_path).items() if name in script.DEFAULT_PARTS]
    checks = [{"name": "step/drdo/llama/bf16", "status": "PASS", "measured": 0.01, "tolerance": 0.02, "detail": "fused"},
              {"name": "deepspeed/deepspeed_zero3", "status": "FAIL", "measured": None, "tolerance": None, "detail": "exit 1"}]
    (tmp_path / "checks.json").write_text(json.dumps({"device": "cuda", "checks": checks}))
    row = {"pairs_per_s": 2.0, "useful_tokens_per_s": 30000.0, "padding": 0.0, "peak_mb": 40000.0, "tflops": 300.0,
           "peak_fraction": 0.38}
    rows = [{**row, "name": "trl_dpo", "speedup": 1.0, "memory_ratio": 1.0},
            {**row, "name": "drdo", "pairs_per_s": 2.6, "speedup": 1.3, "memory_ratio": 0.8}]
    (tmp_path / "llama3.json").write_text(json.dumps({
        "settings": {"preset": "llama3-1b", "checkpointing": "True", "dtype": "bf16"},
        "matmul_peak_flops": {"bf16": {"peak": 7.9e14}}, "rows": rows,
        "skipped": {"trl_dpo_liger": "configuration trl_dpo_liger failed (exit 1) ... ImportError"}}))
    out = script.table(listed, {"checks": "failed (exit 1), 80 s", "llama3": "ok, 300 s"}).splitlines()
    assert out[0] == "Correctness on cuda: 1 pass, 1 fail, 0 skip"
    assert out[1] == "- FAIL deepspeed/deepspeed_zero3 (exit 1)"  # failures first
    assert out[2] == "- PASS step/drdo/llama/bf16: 0.01 <= 0.02 (fused)"
    assert sum(line.startswith("| part |") for line in out) == 1  # one table
    assert "| llama3 | DRDO (ours) | 2.60 | 30,000 | 0.0% | 40,000 | 1.30x | 0.80x | 300.00 | 38.0% |" in out
    assert "llama3: left out TRL DPOTrainer + Liger kernels (live ref): configuration trl_dpo_liger failed (exit 1) ... ImportError" in out
    assert "llama3: preset llama3-1b, checkpointing True; matmul peak bf16 790.0 TFLOP/s; % of peak against bf16" in out


def test_a_budgeted_benchmark_leaves_out_what_fails_or_does_not_fit(monkeypatch, tmp_path):
    """``--time-limit``: a configuration that fails, or would start after the limit, is listed and left out;
    without it only an optional configuration (TRL with Liger) may fail."""
    bench = load_benchmark()
    clock = iter([0.0, 0.0, 1.0, 2.0, 3.0, 50.0, 50.0])  # run_rounds' start, before each configuration, its end
    monkeypatch.setattr(bench.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(bench, "machine_busy_s", lambda: 0.0)
    monkeypatch.setattr(bench, "own_busy_s", lambda: 0.0)
    timeouts = {}

    def worker(name, args, result_file, timeout_s=None):
        timeouts[name] = timeout_s
        if name in ("dpo_live", "trl_dpo_liger"):
            raise bench.WorkerFailed(f"configuration {name} failed (exit 1):\nTraceback ...\nImportError: no")
        return {"ran": name}

    monkeypatch.setattr(bench, "run_worker", worker)
    names = ["trl_dpo", "drdo", "dpo_live", "trl_dpo_liger", "dpo_precomputed"]
    args = bench.parse_args(["--rounds", "1", "--time-limit", "10"])
    args.skipped, args.workdir, args.deadline = {}, tmp_path, 10.0  # main's: the limit from its start
    results, _ = bench.run_rounds(names, args)
    assert {n: len(r) for n, r in results.items()} == {"matmul": 1, "trl_dpo": 1, "drdo": 1, "dpo_live": 0,
                                                       "trl_dpo_liger": 0, "dpo_precomputed": 0}
    assert timeouts == {"matmul": None, "trl_dpo": 10.0, "drdo": 9.0, "dpo_live": 8.0, "trl_dpo_liger": 7.0}
    assert args.skipped == {
        "dpo_live": "configuration dpo_live failed (exit 1): ... ImportError: no",
        "trl_dpo_liger": "configuration trl_dpo_liger failed (exit 1): ... ImportError: no",
        "dpo_precomputed": "not started in round 1: --time-limit 10 s reached",
    }
    # Without a time limit a failure stops the benchmark, except an optional configuration's.
    clock = iter(range(100))
    args = bench.parse_args(["--rounds", "1"])
    args.skipped, args.workdir, args.deadline = {}, tmp_path, math.inf
    results, _ = bench.run_rounds(["trl_dpo", "trl_dpo_liger", "drdo"], args)
    assert list(args.skipped) == ["trl_dpo_liger"] and len(results["drdo"]) == 1
    with pytest.raises(bench.WorkerFailed, match="dpo_live"):
        bench.run_rounds(["trl_dpo", "dpo_live"], args)


def test_the_default_head_is_chosen_per_device_in_one_place(tiny_model_dir, monkeypatch):
    """``chunked_head: null`` reads ``heads.HEAD_DEFAULTS`` by the model's device type: the CPU's entry as
    measured on CPU, the CUDA entry (for the GPU run to decide) read from its own key alone."""
    assert heads.head_default("cpu") == HeadDefault(fuse_training=True, chunked_from_vocabulary=100_000)
    assert heads.head_default("mps") == heads.head_default("cpu")  # a device type without an entry
    monkeypatch.setitem(heads.HEAD_DEFAULTS, "cuda", HeadDefault(fuse_training=False, chunked_from_vocabulary=1))
    assert heads.head_default("cuda") == HeadDefault(fuse_training=False, chunked_from_vocabulary=1)
    assert heads.head_default("cpu") == HeadDefault(fuse_training=True, chunked_from_vocabulary=100_000)

    module = DRDO(str(tiny_model_dir))
    module.configure_model()
    lm = module.policy.lm  # a small vocabulary on the CPU: fused in training, one piece elsewhere
    assert module.step_may_fuse("train") and heads.head_chunk_rows(lm, None) is None
    monkeypatch.setitem(heads.HEAD_DEFAULTS, "cpu", HeadDefault(fuse_training=False, chunked_from_vocabulary=1))
    assert not module.step_may_fuse("train") and heads.head_chunk_rows(lm, None) >= 1
    # The module's own setting still wins over the device's default.
    module.hparams.chunked_head = True
    assert module.step_may_fuse("train")


def test_the_gpu_machines_wheels_are_versions_the_project_accepts():
    """``benchmarks/gpu_wheels.txt`` pins one version of each package, each within what pyproject.toml asks
    for (dependencies, and the extras the GPU run uses), and carries every package of the ``gpu`` extra."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    pinned = {canonicalize_name(r.name): next(iter(r.specifier)).version for r in pins}
    assert len(pinned) == len(pins) and all(str(r.specifier).startswith("==") for r in pins)  # one version each
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *extras["bench"], *extras["deepspeed"], *extras["gpu"]]]
    checked = [r for r in wanted if canonicalize_name(r.name) in pinned]
    for requirement in checked:
        assert requirement.specifier.contains(pinned[canonicalize_name(requirement.name)]), requirement
    assert {canonicalize_name(Requirement(r).name) for r in extras["gpu"]} <= set(pinned)
    assert {"transformers", "trl", "deepspeed", "liger-kernel"} <= {canonicalize_name(r.name) for r in checked}
