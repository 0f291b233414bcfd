"""Off-the-shelf reward models (``AutoModelForSequenceClassification``, one label) as Oracle and judge."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fit_argv
from test_cli import read_metrics, series
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPTNeoXConfig, Qwen2Config

from drdo_lightning.cli import main
from drdo_lightning.evaluation.judges import RewardModelJudge
from drdo_lightning.scoring import load_scorer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONFIGS = {
    "qwen2-chat": lambda v: Qwen2Config(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_labels=1),
    "gpt-neox-plain": lambda v: GPTNeoXConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_labels=1),
}


@pytest.fixture(params=sorted(CONFIGS))
def public_reward_model(request, tmp_path_factory, tiny_tokenizer):
    """``(path, model, tokenizer)``: a tiny one-label sequence classifier saved as public ones are."""
    torch.manual_seed(0)
    config = CONFIGS[request.param](len(tiny_tokenizer))
    config.pad_token_id = tiny_tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config).eval()
    tokenizer = copy.deepcopy(tiny_tokenizer)
    if request.param.endswith("chat"):
        tokenizer.chat_template = CHATML
    path = tmp_path_factory.mktemp("public_rm") / request.param
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def expected_reward(model, tokenizer, prompt: str, response: str) -> float:
    """The model's own score of the text as it reads it: a one-turn chat if it has a template."""
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids += tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_score_and_judge_read_a_public_reward_model_and_drdo_trains_on_its_scores(
    public_reward_model, tmp_path, pairs16, tiny_model_dir
):
    path, model, tokenizer = public_reward_model
    scored = tmp_path / "scored.jsonl"
    main(["score", "--models", json.dumps([str(path)]), "--data", str(pairs16), "--output", str(scored),
          "--batch_size", "5", "--output_prefix", "rm_"])
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    for row in rows[:6]:
        for side in ("chosen", "rejected"):
            assert row[f"rm_{side}"] == pytest.approx(expected_reward(model, tokenizer, row["prompt"], row[side]), abs=1e-5)
    assert len({row["rm_chosen"] for row in rows}) == len(rows)  # a real score per row, not a constant

    judge = RewardModelJudge(str(path), batch_size=3)
    judged = judge([r["prompt"] for r in rows[:6]], [r["chosen"] for r in rows[:6]])
    assert judged == pytest.approx([r["rm_chosen"] for r in rows[:6]], abs=1e-5)

    main(fit_argv(tmp_path / "drdo", tiny_model_dir, scored, "--data.chosen_score_column", "rm_chosen",
                  "--data.rejected_score_column", "rm_rejected", "--trainer.max_steps", "2"))
    assert len(series(read_metrics(tmp_path / "drdo"), "train/distillation")) == 2



def test_store_in_bf16_halves_the_weights_and_scores_as_the_rounded_model(tmp_path, tiny_model_dir):
    from drdo_lightning.models import CausalLMWithRewardHead
    from drdo_lightning.stages import store_in_bf16

    torch.manual_seed(0)
    model = CausalLMWithRewardHead.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "fp32", tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    shutil.copytree(tmp_path / "fp32", tmp_path / "bf16")
    store_in_bf16(tmp_path / "bf16")
    size = lambda d: sum(p.stat().st_size for p in (tmp_path / d).glob("*.safetensors"))
    assert size("bf16") < 0.6 * size("fp32")
    rounded, _ = load_scorer(str(tmp_path / "fp32"))
    for p in rounded.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    stored, _ = load_scorer(str(tmp_path / "bf16"))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(stored.rewards(ids, mask), rounded.rewards(ids, mask))


def test_score_takes_the_prompt_from_implicit_prompt_rows(tmp_path, pairs16):
    """`--prompt_column null`: the prompt is what chosen and rejected share, as in training."""
    rows = [json.loads(line) for line in pairs16.read_text().splitlines()]
    rows = [r for r in rows if r["chosen"].split()[0] != r["rejected"].split()[0]][:4]  # they differ at the first word
    explicit, implicit = tmp_path / "explicit.jsonl", tmp_path / "implicit.jsonl"
    explicit.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    implicit.write_text("".join(json.dumps({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
                                + "\n" for r in rows))
    oracle = str(Path(__file__).resolve().parents[1] / "embedded_default" / "oracle")
    for data, extra in ((explicit, []), (implicit, ["--prompt_column", "null"])):
        main(["score", "--models", json.dumps([oracle]), "--data", str(data), "--output", str(data.with_suffix(".out.jsonl")),
              *extra])
    got, want = ([json.loads(line) for line in p.with_suffix(".out.jsonl").read_text().splitlines()] for p in (implicit, explicit))
    assert [(g["oracle_chosen"], g["oracle_rejected"]) for g in got] == [(w["oracle_chosen"], w["oracle_rejected"]) for w in want]
