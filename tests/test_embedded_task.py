"""Tests for the embedded default task (drdo_lightning.embedded_default.task)."""

import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from drdo_lightning.embedded_default import OOD_PROMPTS
from drdo_lightning.embedded_default import task as embedded
from drdo_lightning.embedded_default.build import write_ood_prompts
from drdo_lightning.experiments.sweeps import EvalSettings

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_sft=200, n_train=300, n_val=50, n_eval=200)
LEXICON = SentimentIntensityAnalyzer().lexicon
DETERMINERS = {"this", "the"}  # every subject starts with one; no opening holds one


@pytest.fixture(scope="module")
def task():
    return embedded.generate_task(0, n_sft=500, n_train=2000, n_val=200, n_eval=200)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded_default")
    return out, embedded.write_task(out, seed=3, **SMALL)


def _words(texts):
    return {word for text in texts for word in text.split()}


def _opening(prompt):
    """The words before the subject: up to the first determiner."""
    words = prompt.split()
    return " ".join(words[:min(words.index(d) for d in DETERMINERS if d in words)])


def _golds(rows):
    return [row[key] for row in rows for key in ("gold_chosen", "gold_rejected")]


def _agreement(rows):
    return sum(row["gold_chosen"] > row["gold_rejected"] for row in rows) / len(rows)


# --- vocabulary and gold reward -------------------------------------------------------------


def test_sentiment_vocabulary_is_in_vader_with_the_right_sign():
    assert 25 <= len(embedded.POSITIVE_WORDS) <= 35 and 25 <= len(embedded.NEGATIVE_WORDS) <= 35
    assert all(LEXICON.get(word, 0.0) > 0 for word in embedded.POSITIVE_WORDS)
    assert all(LEXICON.get(word, 0.0) < 0 for word in embedded.NEGATIVE_WORDS)


def test_prompts_and_filler_are_neutral_to_vader():
    filler = embedded.NEUTRAL_CLAUSES + embedded.ASPECTS + embedded.FILM_NOUNS + embedded.MODIFIERS + embedded.CONNECTORS
    prompt_parts = (embedded.PROMPT_LEADS + embedded.PROMPT_SUBJECTS + embedded.PROMPT_TAILS
                    + embedded.OOD_PROMPT_LEADS + embedded.OOD_PROMPT_SUBJECTS)
    words = set(re.findall(r"[a-z]+", " ".join(filler + prompt_parts).lower()))
    assert not {word for word in words if word in LEXICON}
    assert embedded.gold_reward(embedded.NEUTRAL_CLAUSES) == [0.0] * len(embedded.NEUTRAL_CLAUSES)


def test_gold_reward_is_vader_compound():
    sentence = "The acting was not great, but I loved the ending!"
    expected = SentimentIntensityAnalyzer().polarity_scores(sentence)["compound"]
    assert embedded.gold_reward([sentence]) == [expected]
    positive, negative = embedded.gold_reward(["this was a wonderful film", "awful and boring"])
    assert positive > 0.3 and negative < -0.3


# --- generated task -------------------------------------------------------------------------


def test_generate_task_is_deterministic_per_seed():
    first = embedded.generate_task(7, **SMALL)
    assert first == embedded.generate_task(7, **SMALL)
    other = embedded.generate_task(8, **SMALL)
    assert first["train"] != other["train"] and first["sft"] != other["sft"]
    assert {r["prompt"] for r in first["eval"]} != {r["prompt"] for r in other["eval"]}


def test_default_sizes_and_row_schema():
    task = embedded.generate_task(0)
    assert {k: len(v) for k, v in task.items()} == {"sft": 5000, "train": 4000, "val": 500, "eval": 200}
    assert set(task["sft"][0]) == {"prompt", "chosen"}
    assert set(task["eval"][0]) == {"prompt"}
    for row in task["train"][:50] + task["val"][:50]:
        assert set(row) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "label_flipped"}
        assert isinstance(row["gold_chosen"], float) and isinstance(row["gold_rejected"], float)
        assert row["chosen"] != row["rejected"] and row["label_flipped"] is False
        assert embedded.gold_reward([row["chosen"], row["rejected"]]) == [row["gold_chosen"], row["gold_rejected"]]


def test_eval_prompts_are_distinct_and_held_out(task):
    eval_prompts = [row["prompt"] for row in task["eval"]]
    assert len(set(eval_prompts)) == len(eval_prompts) == 200
    used = {row["prompt"] for split in ("sft", "train", "val") for row in task[split]}
    assert used.isdisjoint(eval_prompts)
    with pytest.raises(ValueError):
        embedded.generate_task(0, n_eval=10_000)


def test_responses_are_short_varied_continuations(task):
    responses = [row["chosen"] for row in task["sft"]]
    assert all(r.startswith(" ") and r.endswith(".") for r in responses)
    assert all(8 <= len(r.split()) <= 25 for r in responses)
    assert len(set(responses)) > 0.9 * len(responses)
    assert sum(" not " in r for r in responses) > 0.1 * len(responses)


def test_gold_rewards_spread_over_both_signs(task):
    golds = _golds(task["train"])
    assert statistics.pstdev(golds) > 0.4
    assert sum(g > 0.5 for g in golds) > 0.2 * len(golds)
    assert sum(g < -0.5 for g in golds) > 0.2 * len(golds)


# --- preference labels ----------------------------------------------------------------------


def test_bradley_terry_labels_follow_gold_when_scale_is_large():
    rows = embedded.generate_task(0, n_sft=1, n_train=1000, n_val=1, bt_scale=50.0)["train"]
    clear = [r for r in rows if abs(r["gold_chosen"] - r["gold_rejected"]) > 0.5]
    assert len(clear) > 300 and _agreement(clear) > 0.95


def test_bradley_terry_labels_are_random_for_near_ties(task):
    near = [r for r in task["train"] if 0 < abs(r["gold_chosen"] - r["gold_rejected"]) < 0.05]
    assert len(near) >= 50
    assert 0.3 < _agreement(near) < 0.7
    # ... while clear differences are mostly, but not always, labelled by gold at the default scale.
    clear = [r for r in task["train"] if abs(r["gold_chosen"] - r["gold_rejected"]) > 0.5]
    assert 0.9 < _agreement(clear) < 1.0


def test_label_flip_rate_flips_exact_count_of_training_rows():
    clean = embedded.generate_task(0, **SMALL)
    noisy = embedded.generate_task(0, **SMALL, label_flip_rate=0.2)
    flipped = [i for i, row in enumerate(noisy["train"]) if row["label_flipped"]]
    assert len(flipped) == round(0.2 * SMALL["n_train"])
    for i, (a, b) in enumerate(zip(clean["train"], noisy["train"])):
        if i in flipped:
            assert (b["chosen"], b["rejected"]) == (a["rejected"], a["chosen"])
            assert (b["gold_chosen"], b["gold_rejected"]) == (a["gold_rejected"], a["gold_chosen"])
        else:
            assert a == b
    assert noisy["val"] == clean["val"] and noisy["sft"] == clean["sft"]


# --- tokenizer and model --------------------------------------------------------------------


def test_tokenizer_round_trips_and_prepends_bos_only(task):
    texts = [r["prompt"] + r["chosen"] for r in task["sft"]]
    tokenizer = embedded.train_tokenizer(texts)
    assert tokenizer.get_vocab() == embedded.train_tokenizer(texts).get_vocab()
    prompt, response = "I watched this movie last night and", " the acting was not great, but I loved it."
    ids = tokenizer(prompt + response)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == embedded.BOS_ID and embedded.EOS_ID not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + response
    # prompt/response boundary is a token boundary: no merge spans it
    assert ids == tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(tokenizer(response, add_special_tokens=False)["input_ids"]) <= 15
    assert tokenizer.convert_ids_to_tokens(list(range(4))) == ["<unk>", "<s>", "</s>", "<pad>"]


def test_tiny_llama_config():
    config = embedded.tiny_llama_config(1000, num_hidden_layers=2)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (1000, 128, 2)
    assert config.tie_word_embeddings and config.max_position_embeddings == 256
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (embedded.BOS_ID, embedded.EOS_ID, embedded.PAD_ID)


def test_write_task_outputs_load(written):
    out, paths = written
    assert paths["train"] == out / "data" / "train.jsonl"
    expected = embedded.generate_task(3, **SMALL)
    for split in ("sft", "train", "val", "eval"):
        with paths[split].open(encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == expected[split]

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(paths["base_model"])
    assert AutoTokenizer.from_pretrained(paths["base_model"]).get_vocab() == tokenizer.get_vocab()
    assert model.config.vocab_size == len(tokenizer)
    assert 0.5e6 < model.num_parameters() < 1.5e6
    assert (paths["base_model"] / "model.safetensors").stat().st_size < 6e6

    text = expected["train"][0]["prompt"] + expected["train"][0]["chosen"]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_describe_task_summarises_a_written_task(tmp_path):
    paths = embedded.write_task(tmp_path, seed=1, label_flip_rate=0.1, **SMALL)
    described = embedded.describe_task(tmp_path, paths)
    assert "rows: sft=200, train=300, val=50, eval=200" in described
    assert "flipped=30" in described and "model.safetensors" in described


# --- out-of-distribution evaluation prompts ---------------------------------------------------


def test_ood_prompt_parts_share_no_opening_or_subject_with_the_task():
    ood_leads, ood_subjects = embedded.OOD_PROMPT_LEADS, embedded.OOD_PROMPT_SUBJECTS
    assert set(ood_leads).isdisjoint(embedded.PROMPT_LEADS) and set(ood_subjects).isdisjoint(embedded.PROMPT_SUBJECTS)
    for ood in ood_leads:  # no opening begins another family's opening
        assert not any(f"{ood} ".startswith(f"{lead} ") or f"{lead} ".startswith(f"{ood} ") for lead in embedded.PROMPT_LEADS)
    # no word of a training subject (movie, film, the genres) in an OOD opening or subject ...
    assert not (_words(embedded.PROMPT_SUBJECTS) - DETERMINERS) & _words(ood_leads + ood_subjects)
    # ... and each OOD subject holds a word that no part of a training prompt has
    task_words = _words(embedded.PROMPT_LEADS + embedded.PROMPT_SUBJECTS + embedded.PROMPT_TAILS)
    assert all(_words([subject]) - task_words for subject in ood_subjects)
    assert len(ood_leads) * len(ood_subjects) * len(embedded.PROMPT_TAILS) >= 200


def test_ood_prompts_share_no_opening_or_subject_with_any_task_prompt(task):
    ood = [row["prompt"] for row in embedded.generate_ood_prompts(0)]
    assert len(set(ood)) == len(ood) == 200
    used = {row["prompt"] for split in ("sft", "train", "val", "eval") for row in task[split]}
    assert used.isdisjoint(ood)
    assert {_opening(p) for p in used} == set(embedded.PROMPT_LEADS)
    assert {_opening(p) for p in ood}.isdisjoint(_opening(p) for p in used)
    used_words = _words(used)
    assert all(_words([p]) - used_words for p in ood)  # its subject: a word no task prompt has
    assert not (_words(embedded.PROMPT_SUBJECTS) - DETERMINERS) & _words(ood)
    assert embedded.gold_reward(ood) == [0.0] * len(ood)


def test_ood_prompts_are_deterministic_per_seed():
    first = embedded.generate_ood_prompts(0)
    assert first == embedded.generate_ood_prompts(0) and set(first[0]) == {"prompt"}
    assert {r["prompt"] for r in first} != {r["prompt"] for r in embedded.generate_ood_prompts(1)}
    assert embedded.generate_ood_prompts(0, n=20) == first[:20]
    with pytest.raises(ValueError):
        embedded.generate_ood_prompts(0, n=10_000)


def test_ood_prompts_tokenize_like_the_training_prompts(task, tiny_tokenizer):
    ood = [row["prompt"] for row in embedded.generate_ood_prompts(0)]
    shipped = AutoTokenizer.from_pretrained(ROOT / "embedded_default" / "base_model")
    for tokenizer in (shipped, tiny_tokenizer):
        for prompt in ood:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == prompt
    # every word is one the tokenizer was trained on, and the shipped one encodes each as one
    # token, as it does the task's prompts
    texts = [row[key] for rows in task.values() for row in rows for key in ("prompt", "chosen", "rejected") if key in row]
    assert _words(ood) <= set(re.findall(r"[A-Za-z]+", " ".join(texts)))
    task_prompts = [row["prompt"] for row in task["train"][:200]] + [row["prompt"] for row in task["eval"]]
    for prompt in ood + task_prompts:
        assert len(shipped(prompt, add_special_tokens=False)["input_ids"]) == len(prompt.split())


def test_shipped_ood_prompts_are_the_generated_ones(tmp_path):
    shipped = ROOT / OOD_PROMPTS
    with shipped.open(encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == embedded.generate_ood_prompts(0)
    assert write_ood_prompts(tmp_path).read_bytes() == shipped.read_bytes()
    with (ROOT / "embedded_default" / "data" / "eval.jsonl").open(encoding="utf-8") as f:
        assert sum(1 for _ in f) == 200  # as many as the in-distribution family
    assert EvalSettings().prompts.endswith("eval.jsonl") and EvalSettings().ood().prompts == OOD_PROMPTS
