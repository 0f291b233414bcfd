"""Every architecture in ``architectures.py``: exact log-probs and rewards, training and export.

The reference for a response's log-prob is the plain ``AutoModelForCausalLM`` forward on that
row alone, without padding: what the model itself computes, post-processing included.
"""

from __future__ import annotations

import math

import pytest
import torch
from architectures import ARCHITECTURES, build
from conftest import fit_argv
from test_cli import read_metrics, series
from transformers import AutoModelForCausalLM

from drdo_lightning import CausalLMWithRewardHead
from drdo_lightning.cli import main
from drdo_lightning.heads import Wanted, sequence_values
from drdo_lightning.models import head_input_width, remove_dropout

NAMES = sorted(ARCHITECTURES)


@pytest.fixture(scope="module", params=NAMES)
def arch(request, tiny_tokenizer):
    """``(name, lm)``: the architecture's tiny random model over the tiny tokenizer's vocabulary."""
    return request.param, build(request.param, len(tiny_tokenizer))


def rows(lm, side: str):
    """Three prompt+response rows of different lengths, padded on ``side``, and the unpadded rows."""
    generator = torch.Generator().manual_seed(0)
    prompt_lens, response_lens = [3, 5, 2], [4, 2, 6]
    length = max(p + r for p, r in zip(prompt_lens, response_lens))
    ids = torch.zeros(3, length, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    unpadded = []
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        seq = torch.randint(1, lm.config.get_text_config().vocab_size, (p + r,), generator=generator)
        start = length - (p + r) if side == "left" else 0
        ids[b, start : start + p + r], mask[b, start : start + p + r] = seq, 1
        labels[b, start + p : start + p + r] = seq[p:]
        unpadded.append((seq, p))
    return ids, mask, labels, unpadded


@torch.no_grad()
def test_response_logps_equal_the_models_own_forward_and_rewards_ignore_padding(arch):
    name, lm = arch
    torch.manual_seed(1)
    model = CausalLMWithRewardHead(lm, CausalLMWithRewardHead.new_reward_head(head_input_width(lm))).eval()
    rewards = {}
    for side in ("left", "right"):
        ids, mask, labels, unpadded = rows(lm, side)
        logps, rewards[side], *_ = sequence_values(model, ids, mask, labels)
        want = torch.stack([
            lm(input_ids=seq[None]).logits[0, p - 1 : -1].log_softmax(-1).gather(-1, seq[p:, None]).sum()
            for seq, p in unpadded
        ])
        torch.testing.assert_close(logps, want, atol=1e-4, rtol=0, msg=f"{name}, {side} padding")
        torch.testing.assert_close(model.rewards(ids, mask), rewards[side], atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards["left"], rewards["right"], atol=1e-5, rtol=0)
    # The logits are large (their softcaps and scales matter), so the check above has teeth.
    assert lm(input_ids=ids).logits.abs().max() > 4.0


@torch.no_grad()
def test_prompt_logps_equal_the_models_own_forward_with_either_padding(arch):
    """The prompt tokens' log-probs (ORPO's NLL over the whole sequence) from the same forward as the response's."""
    name, lm = arch
    model = CausalLMWithRewardHead(lm).eval()
    for side in ("left", "right"):
        ids, mask, labels, unpadded = rows(lm, side)
        values = sequence_values(model, ids, mask, labels, Wanted(average=True, prompt_logps=True))
        logps, prompt = values.logps, values.prompt_logps
        torch.testing.assert_close(logps, sequence_values(model, ids, mask, labels, Wanted(average=True)).logps, atol=1e-6, rtol=0)
        want = torch.stack([
            lm(input_ids=seq[None]).logits[0, : p - 1].log_softmax(-1).gather(-1, seq[1:p, None]).sum() for seq, p in unpadded
        ])
        torch.testing.assert_close(prompt, want, atol=1e-4, rtol=0, msg=f"{name}, {side} padding")


@torch.no_grad()
def test_removing_dropout_makes_train_mode_deterministic(arch):
    name, lm = arch
    lm = build(name, lm.config.get_text_config().vocab_size).train()
    remove_dropout(lm)
    ids, mask, _, _ = rows(lm, "right")
    first, second = (lm(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert torch.equal(first, second), name
    lm.eval()


@pytest.mark.parametrize("objective", ["DRDO", "DPO"])
def test_trains_through_the_cli_and_exports_for_transformers(objective, arch, tmp_path, tiny_tokenizer, pairs16):
    name, lm = arch
    start = tmp_path / "start"
    lm.save_pretrained(start)
    tiny_tokenizer.save_pretrained(start)
    scores = ["--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected"]
    cli = main(fit_argv(tmp_path, start, pairs16, *(scores if objective == "DRDO" else []),
                        "--model.learning_rate", "1e-3", "--trainer.max_steps", "2", objective=objective, export=True))
    loss = series(read_metrics(tmp_path), "train/loss")
    assert len(loss) == 2 and torch.tensor(loss).isfinite().all(), (name, loss)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported) is type(lm)
    trained = cli.model.policy.lm.eval()
    changed = False
    for (key, before), after in zip(lm.state_dict().items(), exported.state_dict().values()):
        torch.testing.assert_close(after, trained.state_dict()[key], msg=f"{name}: {key} not exported as trained")
        changed |= not torch.equal(before, after)
    assert changed, f"{name}: training left every weight as it was"
    if objective == "DRDO":
        head = CausalLMWithRewardHead.from_pretrained(tmp_path / "export").reward_head
        torch.testing.assert_close(head.weight, cli.model.policy.reward_head.weight)


@pytest.mark.parametrize("name", ["opt-125m-shape", "gpt2"])
def test_dpo_starts_at_log_2_with_dropout_in_the_config_unless_asked_to_keep_it(name, tmp_path, tiny_tokenizer, pairs16):
    lm = build(name, len(tiny_tokenizer))
    assert remove_dropout(build(name, len(tiny_tokenizer))) > 0  # the config does have dropout
    start = tmp_path / "start"
    lm.save_pretrained(start)
    tiny_tokenizer.save_pretrained(start)
    first_loss = {}
    for keep in ("false", "true"):
        root = tmp_path / f"keep_dropout_{keep}"
        main(fit_argv(root, start, pairs16, "--trainer.max_steps", "1",
                      "--model.disable_dropout", "false" if keep == "true" else "true", objective="DPO"))
        (first_loss[keep],) = series(read_metrics(root), "train/loss")
    # The policy equals its reference at the first step: every implicit reward is 0.
    assert first_loss["false"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first_loss["true"] - math.log(2)) > 1e-3
