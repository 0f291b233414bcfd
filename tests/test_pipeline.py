"""The whole pipeline on a user's own data: conversational pairs, their lengths, their chat template."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from drdo_lightning import data, scoring
from drdo_lightning.cli import main
from drdo_lightning.jsonl import write_jsonl

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MAX_PROMPT_LENGTH, MAX_LENGTH = 96, 400


def conversation(row: dict, *sides: str) -> dict:
    """A TRL-layout row; responses four times as long as the task's, longer than 128 tokens with the prompt."""
    out = {"prompt": [{"role": "user", "content": row["prompt"]}]}
    for side in sides:
        out[side] = [{"role": "assistant", "content": row[side] * 4}]
    return out


@pytest.mark.slow
def test_paper_pipeline_on_conversational_data_with_its_own_lengths(tmp_path, tiny_task, tiny_model_dir, monkeypatch):
    files = {
        "sft": write_jsonl(tmp_path / "sft.jsonl", [conversation(r, "chosen") for r in tiny_task["sft"][:16]]),
        "train": write_jsonl(tmp_path / "train.jsonl", [conversation(r, "chosen", "rejected") for r in tiny_task["train"][:16]]),
        "val": write_jsonl(tmp_path / "val.jsonl", [conversation(r, "chosen", "rejected") for r in tiny_task["val"][:8]]),
    }
    budgets, truncated, longest = set(), [], []

    def recording(pairs, tokenizer, *, max_prompt_length, max_length, drop_long):
        columns, counts = tokenize(pairs, tokenizer, max_prompt_length=max_prompt_length, max_length=max_length,
                                   drop_long=drop_long)
        budgets.add((max_prompt_length, max_length))
        truncated.append(dict(counts))
        longest.append(max(len(p) + len(c) for p, c in zip(columns["prompt_ids"], columns["chosen_ids"])))
        return columns, counts

    tokenize = data.tokenize_pairs
    monkeypatch.setattr(data, "tokenize_pairs", recording)  # every training stage
    monkeypatch.setattr(scoring, "tokenize_pairs", recording)  # every scoring pass
    out = tmp_path / "paper"
    table = main([
        "paper-pipeline", "--out", str(out), "--sft_data", str(files["sft"]), "--train_data", str(files["train"]),
        "--val_data", str(files["val"]), "--base_model", str(tiny_model_dir), "--chat_template", TEMPLATE,
        "--max_prompt_length", str(MAX_PROMPT_LENGTH), "--max_length", str(MAX_LENGTH),
        "--students", "[drdo, edpo]", "--members", "2",
        "--overrides", json.dumps({"trainer.max_steps": 2, "trainer.enable_progress_bar": False,
                                   "data.cache_dir": str(tmp_path / "cache"), "data.batch_size": 8}),
        "--eval_prompts", "3",
        "--evaluation", json.dumps({"temperatures": [0.7], "max_new_tokens": 6, "bootstrap_samples": 20}),
    ])
    assert "| drdo |" in table and "| edpo |" in table and (out / "summary.md").is_file()
    # Every stage tokenized with the user's budgets (sequences longer than 128), and none had to cut anything.
    assert budgets == {(MAX_PROMPT_LENGTH, MAX_LENGTH)} and truncated and not any(truncated) and max(longest) > 128
    for stage in ("sft", "oracle", "ensemble/member_0", "ensemble/member_1", "drdo", "edpo"):
        (config,) = (out / stage).glob("logs/version_*/config.yaml")
        settings = yaml.safe_load(config.read_text())["data"]
        assert (settings["max_prompt_length"], settings["max_length"], settings["chat_template"]) == (
            MAX_PROMPT_LENGTH, MAX_LENGTH, TEMPLATE), stage
    scored = [json.loads(line) for line in (out / "data" / "train.scored.jsonl").read_text().splitlines()]
    assert isinstance(scored[0]["chosen"], list) and len(scored[0]["ensemble_chosen"]) == 2
    # The report: every policy sampled on the conversations through its chat template, judged by the Oracle.
    generations = [json.loads(line) for line in (out / "evaluation" / "generations.jsonl").read_text().splitlines()]
    assert {g["policy"] for g in generations} == {"sft", "drdo", "edpo"} and len(generations) == 3 * 3
    assert all(isinstance(g["prompt"], list) and g["prompt"][-1]["role"] == "user" for g in generations)
    assert all(math.isfinite(g["rewards"]["oracle"]) for g in generations)
    assert (out / "evaluation" / "report.md").is_file()
