"""Evaluation: win rates and bootstrap intervals on hand-computed cases, seeded batched sampling,
reward-model judging, and the ``evaluate`` command end to end on tiny models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from drdo_lightning import CausalLMWithRewardHead
from drdo_lightning.cli import main
from drdo_lightning.data.datamodule import PreferenceDataModule
from drdo_lightning.data.tokenization import load_tokenizer
from drdo_lightning.embedded_default.task import gold_reward
from drdo_lightning.errors import DataError
from drdo_lightning.evaluation.generation import generate, load_policy
from drdo_lightning.evaluation.judges import RewardModelJudge
from drdo_lightning.evaluation.plots import plot_training_curves, read_training_log
from drdo_lightning.evaluation.sampling import read_prompts
from drdo_lightning.evaluation.statistics import (
    bootstrap_mean,
    distinct_n,
    margin_bin_accuracy,
    paired_comparison,
    summarize,
    wilson_interval,
)
from drdo_lightning.jsonl import write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- statistics ------------------------------------------------------------------------------


def test_compare_matches_a_hand_computed_case_with_a_tie():
    # Two prompts x two temperatures. Cells: 1>0 win, 2=2 tie, 3<4 loss, 3>1 win.
    a = np.array([[1.0, 2.0], [3.0, 3.0]])
    b = np.array([[0.0, 2.0], [4.0, 1.0]])
    stats = paired_comparison(a, b, samples=2000, seed=0)
    assert stats["win"].value == 0.5 and stats["tie"].value == 0.25 and stats["loss"].value == 0.25
    assert stats["win_rate"].value == 0.625  # (2 wins + 1 tie / 2) / 4
    # Per-prompt win rates are 0.75 and 0.5; resampled means take 0.5, 0.625, 0.75 with
    # probability 1/4, 1/2, 1/4, so the 95% interval spans the two extremes.
    assert (stats["win_rate"].low, stats["win_rate"].high) == (0.5, 0.75)
    assert paired_comparison(b, a)["win_rate"].value == pytest.approx(1 - 0.625)


def test_identical_policies_win_half_the_time_with_a_collapsed_interval():
    rewards = np.random.default_rng(0).normal(size=(50, 4))
    stats = paired_comparison(rewards, rewards.copy())
    assert stats["win"].value == 0.0 and stats["tie"].value == 1.0
    assert tuple(stats["win_rate"]) == (0.5, 0.5, 0.5)


def test_policies_with_the_same_distribution_get_an_interval_around_half():
    rng = np.random.default_rng(1)
    stats = paired_comparison(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)))
    low, high = stats["win_rate"].low, stats["win_rate"].high
    assert low < 0.5 < high and high - low < 0.15
    assert stats["tie"].value == 0.0


def test_one_prompt_gives_a_point_interval():
    stats = paired_comparison(np.array([[1.0, 0.0, 5.0, 2.0]]), np.array([[0.0, 0.0, 1.0, 3.0]]))
    assert tuple(stats["win_rate"]) == (0.625, 0.625, 0.625)
    assert tuple(bootstrap_mean([0.3])) == (0.3, 0.3, 0.3)


def test_bootstrap_is_seeded_and_about_as_wide_as_the_normal_interval():
    values = np.random.default_rng(2).normal(1.0, 2.0, size=400)
    first, again, other = bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=4)
    assert first == again and first != other
    assert first.low < values.mean() < first.high
    normal_width = 2 * 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert first.high - first.low == pytest.approx(normal_width, rel=0.15)


def test_summarize_reports_advantage_win_rates_and_pooled_temperatures():
    sft = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    scores = {"gold": {"sft": sft, "drdo": sft + np.array([[0.5, -0.25]])}}
    rows = summarize(scores, [0.2, 0.9], baseline="sft", samples=200)
    get = {(r["policy"], r["opponent"], r["temperature"], r["statistic"]): r for r in rows}
    assert get[("drdo", "sft", "0.2", "advantage")]["value"] == pytest.approx(0.5)
    assert get[("drdo", "sft", "all", "advantage")]["value"] == pytest.approx(0.125)
    assert get[("drdo", "sft", "0.2", "win_rate")]["value"] == 1.0 and get[("drdo", "sft", "0.9", "win")]["value"] == 0.0
    for t in ("0.2", "0.9", "all"):
        assert get[("drdo", "sft", t, "win_rate")]["value"] + get[("sft", "drdo", t, "win_rate")]["value"] == pytest.approx(1)
    assert get[("sft", "", "all", "mean_reward")]["value"] == pytest.approx(0.5)
    assert ("sft", "sft", "all", "advantage") not in get


# -- sampling and judging ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_prompts(tiny_task) -> list[str]:
    return [row["prompt"] for row in tiny_task["eval"]]


def test_prompts_are_read_in_order_up_to_a_limit_as_text_or_conversations(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": [{"role": "user", "content": "c"}]}\n')
    assert read_prompts(str(path), limit=2) == ["a", "b"]
    assert read_prompts(str(path))[2] == [{"role": "user", "content": "c"}]
    for number, bad, reason in ((2, '""', "expected a non-empty string or a list of messages"),
                                (1, '[{"role": "assistant", "content": "x"}]', "a conversation to answer must not end with an assistant turn")):
        lines = path.read_text().splitlines()
        lines[number - 1] = f'{{"prompt": {bad}}}'
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=f"row {number}: 'prompt': {reason}"):
            read_prompts(str(path))


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_conversations_are_sampled_and_judged_through_the_chat_template(tmp_path, tiny_model_dir, eval_prompts):
    """What a policy and an Oracle trained on conversational data see: the template's rendering."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir), chat_template=CHAT_TEMPLATE)
    judge_dir = CausalLMWithRewardHead.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    conversations = [[{"role": "user", "content": p}] for p in eval_prompts[:3]]
    model, policy_tokenizer = load_policy(str(judge_dir))
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        greedy = generate(model, policy_tokenizer, [conversation], temperature=0, max_new_tokens=4)
        alone = model.generate(torch.tensor([want]), max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert greedy == tokenizer.batch_decode(alone[:, len(want):], skip_special_tokens=True)
    judge = RewardModelJudge(str(judge_dir), batch_size=2)
    responses = [" the plot was great.", " dull.", " fine."]
    rewards = judge(conversations, responses)
    pairs = [{"prompt": c, "chosen": [{"role": "assistant", "content": r}]} for c, r in zip(conversations, responses)]
    dm = PreferenceDataModule(train_file=str(write_jsonl(tmp_path / "conv.jsonl", pairs)), tokenizer=str(judge_dir),
                              rejected_column=None, cache_dir=None)
    dm.setup("fit")
    for example, reward in zip(dm.train_dataset, rewards):  # tokenized as the Oracle trained
        ids = example["prompt_ids"] + example["chosen_ids"]
        with torch.no_grad():
            want = judge.scorer.model.rewards(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
        assert reward == pytest.approx(want, abs=1e-5)
    with pytest.raises(DataError, match="no chat template"):
        generate(*load_policy(str(tiny_model_dir)), conversations[:1], temperature=0, max_new_tokens=2)


def test_generation_is_reproducible_for_a_seed_and_leaves_the_rng_alone(tiny_model_dir, eval_prompts):
    model, tokenizer = load_policy(str(tiny_model_dir))
    state = torch.get_rng_state()
    kwargs = dict(temperature=0.9, max_new_tokens=8, batch_size=3)
    first = generate(model, tokenizer, eval_prompts, seed=0, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tokenizer, eval_prompts, seed=0, **kwargs) == first
    assert generate(model, tokenizer, eval_prompts, seed=1, **kwargs) != first
    assert len(first) == len(eval_prompts) and any(first)


def test_left_padded_batches_generate_as_one_prompt_at_a_time(tiny_model_dir, eval_prompts):
    model, tokenizer = load_policy(str(tiny_model_dir))
    assert len({len(tokenizer(p)["input_ids"]) for p in eval_prompts}) > 1  # padding really happens
    batched = generate(model, tokenizer, eval_prompts, temperature=0, max_new_tokens=8, batch_size=len(eval_prompts))
    single = generate(model, tokenizer, eval_prompts, temperature=0, max_new_tokens=8, batch_size=1)
    assert batched == single


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    torch.manual_seed(0)
    model = CausalLMWithRewardHead.from_pretrained(tiny_model_dir)  # a fresh, random reward head
    return model.save_pretrained(tmp_path_factory.mktemp("judge") / "rm", tokenizer=load_tokenizer(str(tiny_model_dir)))


def test_reward_model_judge_scores_like_the_model_and_ties_identical_responses(reward_model_dir, eval_prompts):
    judge = RewardModelJudge(str(reward_model_dir), batch_size=2)
    prompts = eval_prompts[:3] + eval_prompts[:1]
    responses = [" the plot was great.", " it was a waste of time.", " I watched it at home.", " the plot was great."]
    rewards = judge(prompts, responses)
    tok = judge.scorer.tokenizer
    for prompt, response, reward in zip(prompts, responses, rewards):
        ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            want = judge.scorer.model.rewards(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
        assert reward == pytest.approx(want, abs=1e-5)
    assert rewards[0] == rewards[3]  # scored once: an exact tie


# -- the command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_policy_dir(tmp_path_factory, tiny_model_dir) -> Path:
    model = CausalLMWithRewardHead.from_pretrained(tiny_model_dir, reward_head=False)
    with torch.no_grad():
        for p in model.lm.parameters():
            p.mul_(1.5)
    return model.save_pretrained(tmp_path_factory.mktemp("other") / "policy", tokenizer=load_tokenizer(str(tiny_model_dir)))


@pytest.fixture(scope="module")
def training_log(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "logs" / "version_0" / "metrics.csv").write_text(
        "epoch,step,train/loss,train/implicit_accuracy,train/chosen_logps,train/rejected_logps,val/loss\n"
        "0,0,1.0,0.5,-20.0,-21.0,\n0,1,0.8,0.6,-19.0,-23.0,\n0,1,,,,,0.9\n"
    )
    return run


def test_training_log_series_and_curves(training_log, tmp_path):
    series = read_training_log(training_log)
    assert series["rejected_logps"] == ([0, 1], [-21.0, -23.0])
    assert "loss" in series and not any(k.startswith("val") for k in series)
    path = plot_training_curves({"drdo": str(training_log)}, tmp_path / "curves.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def run_evaluate(out: Path, policies: dict, judges: dict, prompts: Path, *extra: str) -> list[dict]:
    return main(["evaluate", "--policies", json.dumps(policies), "--judges", json.dumps(judges),
                 "--prompts", str(prompts), "--out", str(out), "--temperatures", "[0.5, 1.0]",
                 "--max_new_tokens", "6", "--batch_size", "3", "--bootstrap_samples", "200", *extra])


def test_evaluate_writes_generations_estimates_plots_and_report(
    tmp_path, tiny_model_dir, other_policy_dir, reward_model_dir, tiny_task, training_log
):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tiny_task["eval"]))
    policies = {"sft": str(tiny_model_dir), "twin": str(tiny_model_dir), "other": str(other_policy_dir)}
    judges = {"rm": str(reward_model_dir), "gold": "vader"}
    rows = run_evaluate(tmp_path / "a", policies, judges, prompts, "--logs", json.dumps({"drdo": str(training_log)}))

    records = [json.loads(line) for line in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    n_prompts = len(tiny_task["eval"])
    assert len(records) == 3 * 2 * n_prompts
    for r in records[:5]:
        assert set(r["rewards"]) == {"rm", "gold"}
        assert r["rewards"]["gold"] == gold_reward([r["response"]])[0]

    get = {(r["judge"], r["policy"], r["opponent"], r["temperature"], r["statistic"]): r for r in rows}
    for judge in judges:
        # The same model with the same seeds samples the same responses: all ties, 50%.
        assert get[(judge, "sft", "twin", "all", "tie")]["value"] == 1.0
        assert tuple(get[(judge, "sft", "twin", "all", "win_rate")][k] for k in ("value", "low", "high")) == (0.5, 0.5, 0.5)
        assert get[(judge, "twin", "sft", "all", "advantage")]["value"] == 0.0
        a, b = get[(judge, "sft", "other", "all", "win_rate")], get[(judge, "other", "sft", "all", "win_rate")]
        assert a["value"] + b["value"] == pytest.approx(1.0) and a["low"] <= a["value"] <= a["high"]
    # Twins sample the same responses, so the same diversity; the figure is the generations' own.
    for t in ("all", "0.5", "1.0"):
        assert get[("", "sft", "", t, "distinct_2")]["value"] == get[("", "twin", "", t, "distinct_2")]["value"]
    t0 = [r["response"] for r in records if r["policy"] == "other" and r["temperature"] == records[0]["temperature"]]
    assert get[("", "other", "", str(records[0]["temperature"]), "distinct_2")]["value"] == distinct_n(t0)
    with (tmp_path / "a" / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)

    report = (tmp_path / "a" / "report.md").read_text()
    for png in ("win_rate_rm.png", "win_rate_gold.png", "reward_vs_temperature.png", "training_curves.png"):
        assert f"]({png})" in report
        assert (tmp_path / "a" / png).read_bytes().startswith(PNG_MAGIC)
    assert "Reward advantage over `sft`" in report
    assert "## Diversity" in report

    # Same seed, same generations; another seed, other generations.
    run_evaluate(tmp_path / "b", {"sft": str(tiny_model_dir)}, {"gold": "vader"}, prompts)
    run_evaluate(tmp_path / "c", {"sft": str(tiny_model_dir)}, {"gold": "vader"}, prompts, "--seed", "1")
    responses = {k: [json.loads(line)["response"] for line in (tmp_path / k / "generations.jsonl").read_text().splitlines()]
                 for k in "bc"}
    assert responses["b"] == [r["response"] for r in records if r["policy"] == "sft"]
    assert responses["c"] != responses["b"]


def test_evaluate_config_parses():
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--config", str(root / "configs" / "evaluate.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)


def test_a_training_checkpoint_is_exported_and_evaluated_like_its_export(tmp_path, tiny_model_dir, pair_files, eval_prompts):
    run = tmp_path / "run"
    main(["fit", "--model", "SFT", "--model.model", str(tiny_model_dir), "--data.train_file", str(pair_files["sft"]),
          "--data.rejected_column", "null", "--data.cache_dir", str(tmp_path / "cache"), "--model.learning_rate", "1e-2",
          "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run),
          "--trainer.logger", "false", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
          "--trainer.callbacks.dirpath", str(run / "checkpoints"), "--trainer.callbacks.save_last", "true",
          "--trainer.callbacks+=drdo_lightning.ExportHuggingFace"])
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in eval_prompts[:3]))
    policies = {"ckpt": str(run / "checkpoints" / "last.ckpt"), "export": str(run / "export")}
    run_evaluate(tmp_path / "out", policies, {"gold": "vader"}, prompts)
    assert (tmp_path / "out" / "policies" / "ckpt" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    by_policy = {name: [r["response"] for r in records if r["policy"] == name] for name in policies}
    assert by_policy["ckpt"] == by_policy["export"] and len(by_policy["ckpt"]) == 6  # same weights, same seeds


def test_distinct_2_counts_distinct_word_bigrams_over_all_of_them():
    assert distinct_n(["a b c", "a b d"]) == 3 / 4  # (a b) twice, (b c), (b d)
    assert distinct_n(["the plot was great"] * 10) == pytest.approx(3 / 30)
    assert distinct_n(["one", ""]) == 0.0
    assert distinct_n(["a b a b"]) == 2 / 3


# -- ranking accuracy by margin bin -------------------------------------------------------------


def test_margin_bins_give_each_rankers_accuracy_against_the_gold_sign_with_ties_as_halves():
    # Ten pairs with |gold| 0.1 .. 1.0 (given shuffled) and one exact gold tie, which has no sign.
    gold = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0, 0.0]
    a = [1.0, -2.0, 0.0, -1.0, 3.0, 1.0, 1.0, -1.0, 2.0, -5.0, 7.0]  # a tie in bin 1, a wrong sign in bin 2
    perm = [7, 2, 10, 0, 9, 4, 1, 6, 3, 8, 5]
    shuffled = lambda xs: [xs[i] for i in perm]  # noqa: E731
    rows = margin_bin_accuracy(shuffled(gold), {"a": shuffled(a), "b": [-x for x in shuffled(a)]}, bins=5)
    table = {(r["ranker"], r["bin"]): r for r in rows}
    assert [table["a", b]["accuracy"] for b in range(5)] == [1.0, 0.75, 0.5, 1.0, 1.0]
    assert [table["b", b]["accuracy"] for b in range(5)] == [0.0, 0.25, 0.5, 0.0, 0.0]
    assert [table["a", b]["ties"] for b in range(5)] == [0, 1, 0, 0, 0]
    assert all(r["n"] == 2 and r["excluded"] == 1 for r in rows)
    assert [(table["a", b]["low"], table["a", b]["high"]) for b in range(5)] == [
        (0.1, 0.2), (0.3, 0.4), (0.5, 0.6), (0.7, 0.8), (0.9, 1.0)]
    # Wilson intervals: 2 of 2 right at 95% is [0.342, 1].
    assert (table["a", 0]["ci_low"], table["a", 0]["ci_high"]) == (pytest.approx(0.3424, abs=1e-4), 1.0)
    assert table["a", 1]["ci_low"] < 0.75 < table["a", 1]["ci_high"]
    # Unequal bins: sizes differ by at most one, the larger first.
    assert [r["n"] for r in margin_bin_accuracy(gold, {"a": a}, bins=3)] == [4, 3, 3]
    with pytest.raises(ValueError, match="cannot fill"):
        margin_bin_accuracy(gold[:3], {"a": a[:3]}, bins=5)
    with pytest.raises(ValueError, match="has 2 predictions for 11 pairs"):
        margin_bin_accuracy(gold, {"a": a[:2]})


def test_wilson_interval_on_known_values():
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 5)[0] == 0.0 and all(np.isnan(wilson_interval(0, 0)))


# -- head to head against a named baseline, and KL to the starting policy ------------------------------


def test_evaluate_names_a_baseline_for_head_to_head_and_reports_kl_to_the_start(
        tmp_path, tiny_model_dir, other_policy_dir, tiny_task):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tiny_task["eval"]))
    policies = {"sft": str(tiny_model_dir), "dpo": str(other_policy_dir), "drdo": str(tiny_model_dir)}
    rows = run_evaluate(tmp_path / "out", policies, {"gold": "vader"}, prompts, "--baseline", "dpo")
    get = {(r["judge"], r["policy"], r["opponent"], r["temperature"], r["statistic"]): r for r in rows}
    records = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    for t in ("0.5", "1.0", "all"):
        for name in ("sft", "drdo"):  # the baseline's paired win rates, with bootstrap intervals
            row = get[("gold", name, "dpo", t, "win_rate")]
            assert row["low"] <= row["value"] <= row["high"]
            assert get[("gold", name, "dpo", t, "advantage")]["low"] is not None
        # KL to sft per policy and temperature: 0 for sft itself and its twin, the mean log-ratio for dpo.
        assert get[("", "sft", "sft", t, "kl")]["value"] == 0.0 and get[("", "drdo", "sft", t, "kl")]["value"] == 0.0
    for t in (0.5, 1.0):
        ratios = [r["logp"] - r["reference_logp"] for r in records if r["policy"] == "dpo" and r["temperature"] == t]
        kl = get[("", "dpo", "sft", str(t), "kl")]
        assert kl["value"] == pytest.approx(np.mean(ratios)) and kl["low"] <= kl["value"] <= kl["high"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Head to head against `dpo`" in report and "Reward advantage over `dpo`" in report
    assert "KL(policy || `sft`)" in report
    # No reference among the policies: no KL, and the report says nothing of it.
    rows = run_evaluate(tmp_path / "b", {"dpo": str(other_policy_dir)}, {"gold": "vader"}, prompts)
    assert not any(r["statistic"] == "kl" for r in rows)
    assert "KL(" not in (tmp_path / "b" / "report.md").read_text()
