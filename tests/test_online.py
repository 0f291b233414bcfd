"""The online mode: pairs sampled from the current policy, scored by an Oracle in memory, trained on
with the objective's own loss (:mod:`drdo_lightning.online`, ``PreferenceModule(online=...)``).

Tiny models built here (``conftest``); judges are functions registered by name, or a reward model
with a tokenizer of its own.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path
from types import SimpleNamespace

import probes  # registers the judge probe-text-hash
import pytest
import torch
from architectures import build
from conftest import fit_argv
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from test_deepspeed import LOSS_RTOL, cli, run
from test_export import logged
from test_reliability import finished_output, start_cli
from test_scoring import expected_reward
from transformers import AutoModelForSequenceClassification, GPTNeoXConfig

from drdo_lightning import DPO, DRDO, IPO
from drdo_lightning.cli import main
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.embedded_default import task as embedded
from drdo_lightning.errors import SettingError
from drdo_lightning.evaluation.judges import RewardModelJudge, register_judge
from drdo_lightning.online.options import OnlineOptions
from drdo_lightning.online.pairs import Pairs, choose_pairs, join_batches, pair_batch, penalised
from drdo_lightning.online.sampling import GenerateSampler, Samples, step_seed
from drdo_lightning.online.source import step_metrics

PROMPTS = ["I rented this family film yesterday and", "The acting", "My friends and I went to see it, and honestly"]


def characters(prompts, responses):
    """A judge by name: the response's length in characters (ties where lengths tie)."""
    return [float(len(r)) for r in responses]


register_judge("test-characters", characters)
register_judge("test-constant", lambda prompts, responses: [1.0] * len(responses))  # every prompt ties


# -- pairs from scores --------------------------------------------------------------------------


def test_best_worst_pairs_the_highest_with_the_lowest_and_drops_ties():
    scores = torch.tensor([[0.1, 0.9, -0.5], [2.0, 2.0, 2.0], [1.0, 3.0, 3.0]])
    pairs = choose_pairs(scores, "best_worst")
    # prompt 0: best 1, worst 2; prompt 1 ties entirely; prompt 2: the first of the equal best (1) against 0
    assert pairs == Pairs(chosen=[1, 7], rejected=[2, 6], ties=1)


def test_random_pairs_are_distinct_scores_chosen_higher_and_follow_the_generator():
    scores = torch.tensor([[1.0, 1.0, 0.0, 2.0]] * 200)
    pairs = choose_pairs(scores, "random", torch.Generator().manual_seed(0))
    assert pairs.ties == 0
    seen = set()
    for w, l in zip(pairs.chosen, pairs.rejected):
        assert w // 4 == l // 4
        assert scores.flatten()[w] > scores.flatten()[l]
        seen.add((w % 4, l % 4))
    # every pair of distinct scores comes up, the tied (0, 1) never
    assert seen == {(0, 2), (1, 2), (3, 0), (3, 1), (3, 2)}
    again = choose_pairs(scores, "random", torch.Generator().manual_seed(0))
    other = choose_pairs(scores, "random", torch.Generator().manual_seed(1))
    assert again == pairs and other != pairs


def test_missing_eos_penalty_reranks_a_cut_response():
    scores = torch.tensor([[1.0, 0.75]])
    ended = torch.tensor([[False, True]])
    assert choose_pairs(penalised(scores, ended, None), "best_worst").chosen == [0]
    ranked = penalised(scores, ended, 0.5)
    assert ranked.tolist() == [[0.5, 0.75]]
    assert choose_pairs(ranked, "best_worst") == Pairs(chosen=[1], rejected=[0], ties=0)


def test_options_name_what_is_out_of_range():
    with pytest.raises(SettingError, match="online.k must be at least 2"):
        OnlineOptions(judge="x", k=1)
    with pytest.raises(SettingError, match="online.temperature"):
        OnlineOptions(judge="x", temperature=0.0)
    with pytest.raises(SettingError, match="online.pairs"):
        OnlineOptions(judge="x", pairs="best")


def test_step_seeds_differ_by_every_part():
    seeds = {step_seed(0, "train", s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(0, "train", 3, 1) == step_seed(0, "train", 3, 1) != step_seed(1, "train", 3, 1)


# -- the pair batch ------------------------------------------------------------------------------


def hand_samples() -> Samples:
    return Samples(prompts=["a", "b"], k=2, prompt_ids=[[1, 5, 6], [1, 7]],
                   response_ids=[[10, 11, 2], [12], [13, 14, 15, 2], [16, 2]],
                   texts=["x", "y", "z", "w"], ended=[True, False, True, True])


def test_pair_batch_is_prompt_plus_response_with_labels_on_the_response_only():
    samples = hand_samples()
    scores = torch.tensor([0.5, -1.0, 2.0, 3.0])
    batch = pair_batch(samples, Pairs(chosen=[0, 3], rejected=[1, 2], ties=0), scores, pad_token_id=0)
    # one padded length for both sides: the longest sequence (6 tokens)
    assert batch["chosen_input_ids"].tolist() == [[1, 5, 6, 10, 11, 2], [1, 7, 16, 2, 0, 0]]
    assert batch["chosen_labels"].tolist() == [[-100, -100, -100, 10, 11, 2], [-100, -100, 16, 2, -100, -100]]
    assert batch["chosen_attention_mask"].tolist() == [[1] * 6, [1] * 4 + [0] * 2]
    assert batch["rejected_input_ids"].tolist() == [[1, 5, 6, 12, 0, 0], [1, 7, 13, 14, 15, 2]]
    assert batch["rejected_labels"].tolist() == [[-100, -100, -100, 12, -100, -100], [-100, -100, 13, 14, 15, 2]]
    assert batch["chosen_score"].tolist() == [0.5, 3.0] and batch["rejected_score"].tolist() == [-1.0, 2.0]


def test_offline_pairs_join_after_the_online_ones_padded_alike():
    online = pair_batch(hand_samples(), Pairs([0], [1], 0), torch.tensor([1.0, 0.0, 0.0, 0.0]), pad_token_id=0)
    offline = PairCollator(0)([{"prompt_ids": [1, 9, 9, 9, 9], "chosen_ids": [20, 21, 2], "rejected_ids": [22, 2]}])
    joined = join_batches(online, offline, pad_token_id=0)
    assert set(joined) == set(offline)  # the offline pairs carry no scores: neither does the joined batch
    assert joined["chosen_input_ids"].tolist() == [[1, 5, 6, 10, 11, 2, 0, 0], [1, 9, 9, 9, 9, 20, 21, 2]]
    assert joined["rejected_labels"].tolist() == [[-100, -100, -100, 12] + [-100] * 4, [-100] * 5 + [22, 2, -100]]
    assert joined["rejected_attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 7 + [0]]


# -- sampling ------------------------------------------------------------------------------------


# Learned absolute positions (GPT-2, OPT's offset ones), rotary (Llama, Qwen3's head norms, Phi's partial
# rotary, GPT-NeoX's parallel residual). Not the soft-capped families: their capped logits tie at the
# cap, and greedy picks among ties by rounding, not by position.
ARCHITECTURES = ["gpt2", "opt-125m-shape", "gpt-neox", "llama", "qwen3", "phi"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_left_padded_sampling_continues_each_prompt_as_alone(name, tiny_tokenizer):
    """At a temperature near 0 (large logits) sampling is greedy: a prompt batched with longer ones
    (left padding, positions from the mask) gets the response it gets alone."""
    lm = build(name, len(tiny_tokenizer))
    options = OnlineOptions(judge="test-characters", k=2, temperature=1e-4, max_new_tokens=6)
    sampler = GenerateSampler(tiny_tokenizer, max_prompt_length=64)
    lm.train()
    batched = sampler(lm, PROMPTS, options, seed=0)
    assert lm.training  # back in the mode it was in
    assert len(batched.response_ids) == len(PROMPTS) * 2 and batched.k == 2
    for i, prompt in enumerate(PROMPTS):
        alone = sampler(lm, [prompt], options, seed=1)
        assert alone.prompt_ids == [batched.prompt_ids[i]]
        assert alone.response_ids[0] == batched.response_ids[2 * i] == batched.response_ids[2 * i + 1]
    assert batched.texts == [tiny_tokenizer.decode(ids, skip_special_tokens=True) for ids in batched.response_ids]


# -- the judge -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_with_own_vocabulary(tmp_path_factory, tiny_task, tiny_tokenizer):
    """A one-label sequence classifier with a tokenizer of 200 tokens trained on other text."""
    texts = [r["rejected"] + " " + r["prompt"] for r in tiny_task["train"]]
    tokenizer = embedded.train_tokenizer(texts, vocab_size=200)
    assert tokenizer.get_vocab() != tiny_tokenizer.get_vocab()
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    path = tmp_path_factory.mktemp("judge") / "rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def online_module(cls, model_dir, tokenizer, **options):
    module = cls(str(model_dir), online=OnlineOptions(**{"judge": "test-characters", "max_new_tokens": 8, **options}))
    module.configure_model()
    module.start_online(tokenizer, torch.device("cpu"))
    return module


def test_the_judge_reads_the_samples_text_with_its_own_tokenizer_and_draws_no_bar(
    tiny_model_dir, tiny_tokenizer, judge_with_own_vocabulary, capfd
):
    path, model, judge_tokenizer = judge_with_own_vocabulary
    module = online_module(DRDO, tiny_model_dir, tiny_tokenizer, judge=str(path), k=2, kl_every_n_steps=0)
    capfd.readouterr()
    step = module.online_batch({"prompts": PROMPTS[:2]}, "train", 0)
    for i, (text, score) in enumerate(zip(step.samples.texts, step.scores)):
        prompt = step.samples.prompts[step.samples.prompt_of(i)]
        assert float(score) == pytest.approx(expected_reward(model, judge_tokenizer, prompt, text), abs=1e-5)
    # A bar per step would bury the training's own; the judge alone (evaluate's) still draws one.
    assert f"judge {path}" not in capfd.readouterr().err
    RewardModelJudge(str(path))(PROMPTS[:1], ["a response"])
    assert f"judge {path}" in capfd.readouterr().err


# -- steps: the objective's own loss on the sampled pairs -----------------------------------------


@pytest.mark.parametrize("cls", [DRDO, DPO], ids=["drdo", "dpo"])
def test_an_online_step_is_the_offline_loss_on_the_same_pairs(cls, tiny_model_dir, tiny_tokenizer):
    module = online_module(cls, tiny_model_dir, tiny_tokenizer, k=3)
    offline = cls(str(tiny_model_dir))
    offline.configure_model()
    offline.policy.load_state_dict(module.policy.state_dict())
    batch = {"prompts": PROMPTS}
    step = module.online_batch(batch, "train", 0)
    loss = module.training_step(batch, 0)  # samples again from the same seed: the same pairs

    samples = step.samples
    examples = []
    for w, l in zip(step.pairs.chosen, step.pairs.rejected):
        assert samples.prompt_of(w) == samples.prompt_of(l) and len(samples.texts[w]) > len(samples.texts[l])
        examples.append({"prompt_ids": samples.prompt_ids[samples.prompt_of(w)], "chosen_ids": samples.response_ids[w],
                         "rejected_ids": samples.response_ids[l], "chosen_score": float(len(samples.texts[w])),
                         "rejected_score": float(len(samples.texts[l]))})
    assert examples, "the tiny policy sampled no pair of different lengths"
    want, _, _ = offline.loss_and_outputs(PairCollator(tiny_tokenizer.pad_token_id)(examples), "train")
    torch.testing.assert_close(loss, want)


def test_the_kl_estimate_starts_at_zero_and_moves_with_the_policy(tiny_model_dir, tiny_tokenizer):
    module = online_module(DRDO, tiny_model_dir, tiny_tokenizer, k=2)
    assert module.online_start is not None and not any(p.requires_grad for p in module.online_start.parameters())
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    module.training_step({"prompts": PROMPTS}, 0)
    assert logged["train/online/kl"] == pytest.approx(0.0, abs=1e-5)
    assert logged["train/online/eos_rate"] <= 1 and logged["train/online/length"] >= 1
    with torch.no_grad():
        for p in module.policy.lm.parameters():
            p.mul_(1.2)
    module.training_step({"prompts": PROMPTS}, 0)
    assert abs(float(logged["train/online/kl"])) > 1e-3
    assert "online_start.lm.model.embed_tokens.weight" in module.state_dict()
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("online_start.") for k in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["online"]["k"] == 2 and checkpoint["online_source"] == {"seed": 0}


def test_the_kl_estimate_runs_every_n_training_steps_and_on_every_validation_batch(tiny_model_dir, tiny_tokenizer,
                                                                                   monkeypatch):
    module = online_module(DRDO, tiny_model_dir, tiny_tokenizer, k=2, kl_every_n_steps=3)
    step = [0]
    monkeypatch.setattr(DRDO, "global_step", property(lambda self: step[0]))
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    estimated = []
    for step[0] in range(5):
        logged.clear()
        module.training_step({"prompts": PROMPTS}, step[0])
        assert "train/online/reward" in logged
        estimated.append("train/online/kl" in logged)
    assert estimated == [True, False, False, True, False]
    logged.clear()
    module.validation_step({"prompts": PROMPTS}, 0)
    assert "val/online/kl" in logged
    never = online_module(DRDO, tiny_model_dir, tiny_tokenizer, k=2, kl_every_n_steps=0)
    assert never.online_start is None  # no frozen copy kept for an estimate never taken
    with pytest.raises(SettingError, match="kl_every_n_steps must be at least 0, got -1"):
        OnlineOptions(judge="test-characters", kl_every_n_steps=-1)


def test_a_step_without_pairs_steps_on_zero_gradients(tmp_path, tiny_model_dir, tiny_tokenizer, pair_files):
    """Every prompt's k scores tie and no offline pairs: the loss is 0 with a zero gradient on every
    trainable parameter, so under DDP this process runs the backward the others all-reduce in, and
    the step is logged with 0 pairs. AdamW steps on those zero gradients: at a first step its moments
    are 0, so only its decoupled weight decay moves the weights, matrices by ``1 - lr * λ``, biases and
    norms not at all (later, the momentum of earlier steps moves them too)."""
    module = online_module(DRDO, tiny_model_dir, tiny_tokenizer, judge="test-constant", kl_every_n_steps=0)
    loss = module.training_step({"prompts": PROMPTS}, 0)
    assert loss.item() == 0.0
    loss.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)

    lr, decay = 1e-2, 0.1
    fit = main(fit_argv(tmp_path, tiny_model_dir, pair_files["train"], "--data.prompts_only", "true",
                        "--model.online.judge", "test-constant", "--model.online.max_new_tokens", "4",
                        "--model.online.kl_every_n_steps", "0", "--model.reward_head_seed", "0",
                        "--model.learning_rate", str(lr), "--model.weight_decay", str(decay),
                        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                        "--trainer.callbacks+=probes.StepLosses", "--trainer.callbacks.path", str(tmp_path / "losses")))
    assert fit.trainer.global_step == 1 and (tmp_path / "losses").read_text().split() == ["1", "0.0"]
    assert logged(tmp_path, "train/online/pairs") == {0: 0.0} and logged(tmp_path, "train/online/ties_dropped") == {0: 8.0}
    start = DRDO(str(tiny_model_dir), reward_head_seed=0)
    start.configure_model()
    before, after = dict(start.policy.named_parameters()), dict(fit.model.policy.named_parameters())
    assert before.keys() == after.keys()
    for name, param in before.items():
        want = param * (1 - lr * decay) if param.dim() >= 2 else param
        torch.testing.assert_close(after[name], want, rtol=0, atol=1e-7, msg=name)


def validate_after_one_step(root: Path, model_dir: Path, pair_files: dict, judge: str) -> None:
    """One online training step, then one validation batch of 8 prompts, each sampled twice."""
    main(fit_argv(root, model_dir, pair_files["train"], "--data.val_file", str(pair_files["val"]),
                  "--data.prompts_only", "true", "--model.online.judge", judge,
                  "--model.online.max_new_tokens", "4", "--model.online.kl_every_n_steps", "0", "--trainer.max_steps", "1",
                  "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
                  "--trainer.num_sanity_val_steps", "0"))


def test_validation_samples_the_validation_prompts_and_logs_their_reward_and_loss(tmp_path, tiny_model_dir, pair_files):
    validate_after_one_step(tmp_path, tiny_model_dir, pair_files, "probe-text-hash")
    # One batch of 8 validation prompts, each sampled twice and scored by a hash of the text in [0, 1).
    assert list(logged(tmp_path, "val/online/pairs").values()) == [8.0]
    (reward,) = logged(tmp_path, "val/online/reward").values()
    assert 0 < reward < 1
    (loss,) = logged(tmp_path, "val/loss").values()
    assert loss > 0


def test_validation_without_a_single_pair_still_logs_every_pair_metric(tmp_path, tiny_model_dir, pair_files):
    # Under DDP an epoch's means are all-reduced key by key: a process whose prompts all tied must log
    # the keys the others log (at weight 0), or the processes wait on different collectives.
    validate_after_one_step(tmp_path, tiny_model_dir, pair_files, "test-constant")
    assert list(logged(tmp_path, "val/online/pairs").values()) == [0.0]
    for name in ("margin_mean", "margin_std", "informative_pairs"):
        (value,) = logged(tmp_path, f"val/online/{name}").values()
        assert math.isnan(value), name  # no pair anywhere: a mean over none, not a made-up 0


def test_step_metrics_from_hand_made_scores():
    samples = hand_samples()
    scores = torch.tensor([0.5, -1.0, 2.0, 3.0])
    step = SimpleNamespace(samples=samples, scores=scores, ranked=scores, pairs=Pairs([0, 3], [1, 2], 1))
    metrics = step_metrics(step, torch.tensor([-1.0, -5.0]), torch.tensor([-1.5, -1.0]))
    assert metrics["reward"] == pytest.approx(1.125) and metrics["length"] == pytest.approx(10 / 4)
    assert metrics["eos_rate"] == pytest.approx(0.75) and metrics["ties_dropped"] == 1
    assert metrics["margin_mean"] == pytest.approx(1.25) and metrics["margin_std"] == pytest.approx(0.25)
    # p_w = sigmoid(0.5) inside (0.05, 0.95), sigmoid(-4) below it
    assert metrics["informative_pairs"] == pytest.approx(0.5)


# -- what the online mode refuses ----------------------------------------------------------------


def test_a_precomputed_reference_cannot_serve_online_pairs(tiny_model_dir):
    with pytest.raises(SettingError, match="precompute_reference"):
        IPO(str(tiny_model_dir), precompute_reference=True, online=OnlineOptions(judge="test-characters"))


@pytest.mark.parametrize("strategy", [lambda: FSDPStrategy(), lambda: DeepSpeedStrategy(stage=3)], ids=["fsdp", "zero3"])
def test_sharded_parameters_stop_the_online_mode_in_setup(strategy, tiny_model_dir):
    module = DRDO(str(tiny_model_dir), online=OnlineOptions(judge="test-characters"))
    module.trainer = SimpleNamespace(strategy=strategy(), datamodule=None)
    with pytest.raises(SettingError, match="cannot sample under .* sharded") as error:
        module.setup("fit")
    assert "\n" not in str(error.value)


def test_data_and_model_must_agree_on_prompts(tiny_model_dir):
    online = DRDO(str(tiny_model_dir), online=OnlineOptions(judge="test-characters"))
    with pytest.raises(SettingError, match="--data.prompts_only true"):
        online.check_data(SimpleNamespace(hparams={"prompts_only": False}))
    with pytest.raises(SettingError, match="--model.online.judge"):
        DRDO(str(tiny_model_dir)).check_data(SimpleNamespace(hparams={"prompts_only": True}))


# -- a run killed and resumed -----------------------------------------------------------------------


def test_sigkill_then_resume_samples_alike_and_ends_with_the_same_weights(
    tmp_path, tiny_model_dir, pair_files, judge_with_own_vocabulary, monkeypatch
):
    """Every step's samples derive from (seed, step, rank) and the seed is in the checkpoint: a run
    killed after its step-2 checkpoint and resumed from it ends where an uninterrupted run does."""
    monkeypatch.setenv("DRDO_THREADS", "off")  # bitwise equality needs one thread count in every run

    def args(root, *more):
        return fit_argv(root, tiny_model_dir, pair_files["train"], "--data.prompts_only", "true",
                        "--model.online.judge", str(judge_with_own_vocabulary[0]), "--model.online.k", "3",
                        "--model.online.max_new_tokens", "6", "--model.online.seed", "7", "--model.learning_rate", "1e-2",
                        "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0", *more, checkpoints=2)

    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    interrupted.mkdir()
    want = main(args(uninterrupted)).model.policy.state_dict()

    killed = start_cli(args(interrupted, "--trainer.callbacks+=probes.SigkillAtStep", "--trainer.callbacks.step", "3"),
                       interrupted)
    output = finished_output(killed)
    assert killed.returncode == -signal.SIGKILL, output[-4000:]
    last = interrupted / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["online_source"] == {"seed": 7}
    assert not any(k.startswith("online_start.") for k in checkpoint["state_dict"])

    resumed = main(args(interrupted, "--ckpt_path", str(last)))
    assert resumed.trainer.global_step == 5
    got = resumed.model.policy.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    samples = list((interrupted / "lightning_logs").rglob("samples.jsonl"))
    assert samples, "no samples were logged"


# -- two processes ------------------------------------------------------------------------------------


BIAS = "reward_head.bias"


def weights_after_step_2(root: Path) -> dict[str, torch.Tensor]:
    """The policy's weights in the checkpoint ``root`` saved after 2 steps."""
    (checkpoint,) = (root / "checkpoints").glob("*step=2.ckpt")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {k.removeprefix("policy."): v for k, v in state.items()}


@pytest.mark.slow
def test_two_ddp_processes_sampling_their_own_prompts_train_as_one(tmp_path, tiny_model_dir, pair_files):
    """2 gloo processes with 4 prompts each per step against one process with those 8: the same
    samples (:class:`probes.PromptSeededSampler` seeds by prompt, not by rank), so the same pairs, the
    mean loss over ranks (``probe/loss``) that of the whole batch and the weights after 2 steps alike
    (``LOSS_RTOL``, as the sharded strategies' comparisons). A third step where rank 1 has no pair
    (its judge ties every sample) ends: rank 1 steps on a zero loss, so the mean over ranks is half rank 0's.
    Both runs last 3 steps: the learning-rate schedule spans the run."""
    def args(root, batch_size, *more):
        return fit_argv(root, tiny_model_dir, pair_files["train"], "--data.prompts_only", "true",
                        "--data.batch_size", str(batch_size), "--model.online.judge", "probe-text-hash",
                        "--model.online.max_new_tokens", "6", "--model.online.kl_every_n_steps", "0",
                        "--model.reward_head_seed", "0", "--model.learning_rate", "1e-2",
                        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", *more,
                        objective="probes.PromptSeededDRDO", checkpoints=2)

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    main(args(single, 8))
    assert logged(single, "train/online/pairs") == {0: 8.0, 1: 8.0, 2: 8.0}  # no prompt tied
    ddp.mkdir()
    run(cli(*args(ddp, 4, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--model.ties_on_rank_one_from", "2",
                  "--trainer.callbacks+=probes.MeanLossOverRanks")), ddp)
    assert logged(ddp, "train/online/pairs") == {0: 4.0, 1: 4.0, 2: 4.0}  # rank 0's
    assert list(ddp.rglob("samples.jsonl")), "rank 0 wrote no samples"  # at step 0, with every rank's help
    mean_over_ranks, want = logged(ddp, "probe/loss"), logged(single, "train/loss")
    assert [mean_over_ranks[step] for step in (0, 1)] == pytest.approx([want[0], want[1]], rel=LOSS_RTOL)
    assert mean_over_ranks[2] == pytest.approx(logged(ddp, "train/loss")[2] / 2, rel=1e-6)

    got, reference = weights_after_step_2(ddp), weights_after_step_2(single)
    assert got.keys() == reference.keys()
    start = DRDO(str(tiny_model_dir), reward_head_seed=0)
    start.configure_model()
    # The reward head's bias cancels in r̂_w - r̂_l: its gradient is 0 but for rounding, which differs
    # with the order of the sums and which Adam scales up to steps of about lr. The rest moved, so
    # that their agreement means something.
    del got[BIAS], reference[BIAS]
    still = [name for name, weight in start.policy.named_parameters() if name != BIAS and torch.allclose(reference[name], weight)]
    assert not still
    for name, weight in reference.items():
        torch.testing.assert_close(got[name], weight, rtol=LOSS_RTOL, atol=1e-6, msg=lambda m: f"{name}: {m}")
