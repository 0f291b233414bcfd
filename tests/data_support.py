"""What the data tests share: building data modules, reading their logged counts, a reference
tokenization, and the tokenizer, rows and cache fixtures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from drdo_lightning.data.datamodule import PreferenceDataModule

SCORES = dict(chosen_score_column="oracle_chosen", rejected_score_column="oracle_rejected")
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
KEYS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_score", "rejected_score")



def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_dm(train_file, tiny_model_dir, **kwargs) -> PreferenceDataModule:
    kwargs.setdefault("cache_dir", None)
    kwargs.setdefault("tokenizer", str(tiny_model_dir))
    return PreferenceDataModule(train_file=str(train_file), **kwargs)


def setup_dm(train_file, tiny_model_dir, **kwargs) -> PreferenceDataModule:
    dm = make_dm(train_file, tiny_model_dir, **kwargs)
    dm.setup("fit")
    return dm


def as_tuples(ds, keys=KEYS) -> list[tuple]:
    return [tuple(json.dumps(ex[k]) for k in keys if k in ex) for ex in ds]


def data_counts(caplog, split="train") -> dict:
    """The truncation/drop counts logged by the data module for ``split``."""
    for rec in caplog.records:
        if rec.name.startswith("drdo_lightning.data") and rec.msg.startswith("%s split:") and rec.args[0] == split:
            return rec.args[3]
    return {}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def rows(tiny_task) -> list[dict]:
    return [dict(r) for r in tiny_task["train"][:16]]


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets` (parquet reading) out of the user's home cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def reference_pair(tok, row, max_prompt_length=10**6, max_length=10**6):
    """What the module should produce for a plain-text row, computed independently."""
    prompt = tok(row["prompt"])["input_ids"]
    assert prompt[0] == tok.bos_token_id
    if len(prompt) > max_prompt_length:
        prompt = prompt[:1] + prompt[len(prompt) - (max_prompt_length - 1):]
    budget = max_length - len(prompt)
    responses = [tok(row[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for k in ("chosen", "rejected")]
    fits = all(len(r) <= budget for r in responses)
    return prompt, [r[:budget] for r in responses], fits


QUESTIONS = [("What is two plus two?", "It is four.", "It is five."), ("Name a colour.", "Blue is one.", "A chair.")]


def ultrafeedback_rows():
    return [
        {
            "prompt": q,
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
        }
        for q, good, bad in QUESTIONS
    ]


def trl_rows():
    return [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        for q, good, bad in QUESTIONS
    ]


def flipped_positions(base, noisy) -> list[int]:
    """The positions where ``noisy`` (a tokenized split) has chosen and rejected (and their scores)
    swapped against ``base``, the same split without label noise; every other pair is unchanged."""
    out = []
    for i, (a, b) in enumerate(zip(base, noisy, strict=True)):
        assert a["prompt_ids"] == b["prompt_ids"]
        if a["chosen_ids"] != b["chosen_ids"]:
            assert (b["chosen_ids"], b["rejected_ids"]) == (a["rejected_ids"], a["chosen_ids"])
            assert (b.get("chosen_score"), b.get("rejected_score")) == (a.get("rejected_score"), a.get("chosen_score"))
            out.append(i)
        else:
            assert b == a
    return out
