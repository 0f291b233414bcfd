"""Tests for drdo_lightning.data: readers, validation, truncation, flipping, caching, collation."""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from drdo_lightning.data import building
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.datamodule import PreferenceDataModule
from drdo_lightning.data.sampling import ResumableSampler
from drdo_lightning.data.tokenization import IGNORE_INDEX
from drdo_lightning.errors import DataError
from drdo_lightning.jsonl import write_jsonl

SCORES = dict(chosen_score_column="oracle_chosen", rejected_score_column="oracle_rejected")
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
KEYS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_score", "rejected_score")


# --- helpers -----------------------------------------------------------------------------------


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


# --- 1. input formats --------------------------------------------------------------------------


def _write_format(fmt: str, rows: list[dict], root: Path) -> Path:
    if fmt == "jsonl":
        return write_jsonl(root / "d.jsonl", rows)
    if fmt == "json":
        path = root / "d.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path
    if fmt == "csv":
        return write_csv(root / "d.csv", rows)
    if fmt == "parquet":
        path = root / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return path
    if fmt == "disk_dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(root / "ds"))
        return root / "ds"
    if fmt == "disk_datasetdict":
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:3])}
        ).save_to_disk(str(root / "dsd"))
        return root / "dsd"
    raise AssertionError(fmt)


def test_jsonl_matches_independent_tokenization(pair_files, tiny_task, tiny_model_dir, tok):
    dm = setup_dm(pair_files["train"], tiny_model_dir, **SCORES)
    assert len(dm.train_dataset) == len(tiny_task["train"])
    for ex, row in zip(dm.train_dataset, tiny_task["train"]):
        prompt, (chosen, rejected), _ = reference_pair(tok, row)
        assert ex["prompt_ids"] == prompt
        assert ex["chosen_ids"] == chosen and ex["rejected_ids"] == rejected
        assert ex["chosen_ids"][-1] == tok.eos_token_id
        assert ex["chosen_score"] == row["oracle_chosen"] and ex["rejected_score"] == row["oracle_rejected"]
    assert dm.val_dataset is None and dm.val_dataloader() == []


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet", "disk_dataset", "disk_datasetdict"])
def test_every_format_yields_the_same_pairs(fmt, rows, tmp_path, tiny_model_dir, hf_cache):
    reference = setup_dm(_write_format("jsonl", rows, tmp_path), tiny_model_dir, **SCORES)
    path = _write_format(fmt, rows, tmp_path)
    dm = setup_dm(path, tiny_model_dir, **SCORES)
    assert as_tuples(dm.train_dataset) == as_tuples(reference.train_dataset)
    assert len(dm.train_dataset) == len(rows)
    # CSV scores are strings on disk; they must come back as the same floats.
    scores = [ex["chosen_score"] for ex in dm.train_dataset]
    assert all(isinstance(s, float) for s in scores)
    assert scores == [r["oracle_chosen"] for r in rows]


def test_datasetdict_splits(rows, tmp_path, tiny_model_dir):
    path = _write_format("disk_datasetdict", rows, tmp_path)
    dm = setup_dm(path, tiny_model_dir, val_file=str(path))  # val from the "validation" split
    assert len(dm.train_dataset) == len(rows) and len(dm.val_dataset) == 3
    assert as_tuples(dm.val_dataset) == as_tuples(dm.train_dataset)[:3]
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'validation'\]"):
        setup_dm(path, tiny_model_dir, split="test")


def test_csv_bad_score_names_line(rows, tmp_path, tiny_model_dir):
    bad = [dict(r) for r in rows[:4]]
    bad[1]["oracle_rejected"] = "high"
    path = write_csv(tmp_path / "bad.csv", bad)
    with pytest.raises(DataError) as e:
        setup_dm(path, tiny_model_dir, **SCORES)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg and "'oracle_rejected'" in msg and "'high'" in msg


# --- 2. column names ---------------------------------------------------------------------------


def test_configurable_column_names(rows, tmp_path, tiny_model_dir):
    renamed = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "s_good": r["oracle_chosen"],
         "s_bad": r["oracle_rejected"]}
        for r in rows
    ]
    reference = setup_dm(write_jsonl(tmp_path / "ref.jsonl", rows), tiny_model_dir, **SCORES)
    dm = setup_dm(
        write_jsonl(tmp_path / "renamed.jsonl", renamed), tiny_model_dir, prompt_column="question",
        chosen_column="good", rejected_column="bad", chosen_score_column="s_good", rejected_score_column="s_bad",
    )
    assert as_tuples(dm.train_dataset) == as_tuples(reference.train_dataset)
    # The default names are missing from this file: the error lists what is there.
    with pytest.raises(DataError) as e:
        setup_dm(tmp_path / "renamed.jsonl", tiny_model_dir)
    msg = str(e.value)
    assert "missing column(s) ['prompt', 'chosen', 'rejected']" in msg
    assert "['bad', 'good', 'question', 's_bad', 's_good']" in msg and "renamed.jsonl" in msg


def test_only_one_score_column_is_rejected(pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match="both chosen_score_column and rejected_score_column"):
        make_dm(pair_files["train"], tiny_model_dir, chosen_score_column="oracle_chosen")


# --- 3. conversational rows --------------------------------------------------------------------

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


@pytest.mark.parametrize("layout", ["ultrafeedback", "trl"])
def test_conversational_rows(layout, tmp_path, tiny_model_dir, tok):
    data = ultrafeedback_rows() if layout == "ultrafeedback" else trl_rows()
    dm = setup_dm(write_jsonl(tmp_path / "conv.jsonl", data), tiny_model_dir, chat_template=TEMPLATE, batch_size=2)
    assert len(dm.train_dataset) == len(QUESTIONS)
    for ex, (q, good, bad) in zip(dm.train_dataset, QUESTIONS):
        # The template writes no BOS; the module must not add one (nor an EOS after the turn).
        assert tok.decode(ex["prompt_ids"]) == f"<|user|>{q}\n<|assistant|>"
        assert tok.decode(ex["chosen_ids"]) == good + "\n"
        assert tok.decode(ex["rejected_ids"]) == bad + "\n"
        assert tok.bos_token_id not in ex["prompt_ids"] and tok.eos_token_id not in ex["chosen_ids"]
    assert dm.tokenizer.pad_token_id is not None
    batch = PairCollator(dm.tokenizer.pad_token_id)(list(dm.train_dataset))
    for k in ("chosen", "rejected"):
        for row, ex in enumerate(dm.train_dataset):
            p, r = ex["prompt_ids"], ex[f"{k}_ids"]
            labels = batch[f"{k}_labels"][row]
            covered = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
            assert covered == list(range(len(p), len(p) + len(r)))
            assert labels[covered].tolist() == r
            assert batch[f"{k}_input_ids"][row, : len(p) + len(r)].tolist() == p + r


def test_conversational_layouts_agree_and_multi_turn(tmp_path, tiny_model_dir, tok):
    uf = setup_dm(write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows()), tiny_model_dir, chat_template=TEMPLATE)
    trl = setup_dm(write_jsonl(tmp_path / "trl.jsonl", trl_rows()), tiny_model_dir, chat_template=TEMPLATE)
    assert as_tuples(uf.train_dataset) == as_tuples(trl.train_dataset)

    history = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
    ]
    row = {"prompt": history, "chosen": [{"role": "assistant", "content": "Bye."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    dm = setup_dm(write_jsonl(tmp_path / "multi.jsonl", [row]), tiny_model_dir, chat_template=str(template_file))
    ex = dm.train_dataset[0]
    assert tok.decode(ex["prompt_ids"]) == "<|system|>Be brief.\n<|user|>Hi.\n<|assistant|>Hello.\n<|user|>Bye?\n<|assistant|>"
    assert tok.decode(ex["chosen_ids"]) == "Bye.\n" and tok.decode(ex["rejected_ids"]) == "No.\n"


def test_conversational_rows_need_a_chat_template(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "conv.jsonl", ultrafeedback_rows())
    with pytest.raises(DataError, match=r"row 1: .*chat_template"):
        setup_dm(path, tiny_model_dir)


def _conv_error(tmp_path, tiny_model_dir, bad_row, name="conv.jsonl"):
    path = write_jsonl(tmp_path / name, ultrafeedback_rows() + [bad_row])
    with pytest.raises(DataError) as e:
        setup_dm(path, tiny_model_dir, chat_template=TEMPLATE)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg
    return msg


def test_conversational_role_errors(tmp_path, tiny_model_dir):
    good = ultrafeedback_rows()[0]
    last_user = dict(good, chosen=good["chosen"][:1])  # the "chosen" conversation ends with the user
    msg = _conv_error(tmp_path, tiny_model_dir, last_user)
    assert "field 'chosen'" in msg and "role 'assistant'" in msg
    other_context = dict(good, rejected=[{"role": "user", "content": "Something else?"}, good["rejected"][1]])
    msg = _conv_error(tmp_path, tiny_model_dir, other_context)
    assert "field 'rejected'" in msg and "differ" in msg
    prompt_ends_with_assistant = dict(
        trl_rows()[0], prompt=[{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hey."}]
    )
    msg = _conv_error(tmp_path, tiny_model_dir, prompt_ends_with_assistant)
    assert "field 'prompt'" in msg and "assistant" in msg
    not_messages = dict(good, rejected=[{"role": "user"}, {"role": "assistant", "content": "x"}])
    assert "field 'rejected'" in _conv_error(tmp_path, tiny_model_dir, not_messages)


@pytest.mark.parametrize("value", [None, []])
def test_conversational_missing_rejected_is_an_error(value, tmp_path, tiny_model_dir):
    good = ultrafeedback_rows()[0]
    msg = _conv_error(tmp_path, tiny_model_dir, dict(good, rejected=value))
    assert "field 'rejected'" in msg


# --- 4. truncation -----------------------------------------------------------------------------


def test_truncation_rule_exact_ids(pair_files, tiny_task, tiny_model_dir, tok, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    mpl, ml = 28, 70  # some prompts and some responses fit, others do not
    dm = setup_dm(pair_files["train"], tiny_model_dir, max_prompt_length=mpl, max_length=ml)
    expected = Counter()
    for ex, row in zip(dm.train_dataset, tiny_task["train"]):
        full_prompt = tok(row["prompt"])["input_ids"]
        prompt, (chosen, rejected), fits = reference_pair(tok, row, mpl, ml)
        assert ex["prompt_ids"] == prompt and ex["chosen_ids"] == chosen and ex["rejected_ids"] == rejected
        if len(full_prompt) > mpl:
            expected["prompt_truncated"] += 1
            # BOS, then the prompt's *last* tokens.
            assert ex["prompt_ids"] == [tok.bos_token_id] + full_prompt[-(mpl - 1):]
        if not fits:
            expected["response_truncated"] += 1
            # Responses keep their *first* tokens: the EOS at the end is cut.
            for k in ("chosen", "rejected"):
                raw = tok(row[k], add_special_tokens=False)["input_ids"]
                if len(raw) + 1 > ml - len(prompt):
                    assert ex[f"{k}_ids"] == raw[: ml - len(prompt)]
                    assert len(ex["prompt_ids"]) + len(ex[f"{k}_ids"]) == ml
        assert len(ex["prompt_ids"]) <= mpl
        assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) <= ml
    n = len(tiny_task["train"])
    assert 0 < expected["prompt_truncated"] < n and 0 < expected["response_truncated"] < n
    assert data_counts(caplog) == dict(expected)


def test_drop_long_drops_exactly_the_pairs_that_do_not_fit(pair_files, tiny_task, tiny_model_dir, tok, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    mpl, ml = 24, 90
    dm = setup_dm(pair_files["train"], tiny_model_dir, max_prompt_length=mpl, max_length=ml, drop_long=True)
    kept = []
    for row in tiny_task["train"]:
        prompt, (chosen, rejected), fits = reference_pair(tok, row, mpl, ml)
        if fits:
            kept.append((prompt, chosen, rejected))
    n_dropped = len(tiny_task["train"]) - len(kept)
    assert 0 < n_dropped < len(tiny_task["train"])
    assert [(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) for ex in dm.train_dataset] == kept
    assert all(ex["chosen_ids"][-1] == tok.eos_token_id for ex in dm.train_dataset)  # nothing cut
    assert data_counts(caplog)["dropped_too_long"] == n_dropped
    assert "response_truncated" not in data_counts(caplog)


def test_everything_dropped_is_an_error(pair_files, tiny_model_dir):
    with pytest.raises(DataError, match="train split is empty after filtering"):
        setup_dm(pair_files["train"], tiny_model_dir, max_prompt_length=2, max_length=4, drop_long=True)


@pytest.mark.parametrize("mpl,ml", [(16, 16), (32, 16), (0, 16)])
def test_bad_length_budgets(mpl, ml, pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        make_dm(pair_files["train"], tiny_model_dir, max_prompt_length=mpl, max_length=ml)


# --- 5. label flipping -------------------------------------------------------------------------


def _flipped(base, flipped) -> list[int]:
    out = []
    for i, (a, b) in enumerate(zip(base, flipped)):
        assert a["prompt_ids"] == b["prompt_ids"]
        if a["chosen_ids"] != b["chosen_ids"]:
            assert (b["chosen_ids"], b["rejected_ids"]) == (a["rejected_ids"], a["chosen_ids"])
            assert (b["chosen_score"], b["rejected_score"]) == (a["rejected_score"], a["chosen_score"])
            out.append(i)
        else:
            assert b == a
    return out


def test_label_flipping(pair_files, tiny_task, tiny_model_dir):
    kw = dict(val_file=str(pair_files["val"]), **SCORES)
    base = setup_dm(pair_files["train"], tiny_model_dir, **kw)
    a = setup_dm(pair_files["train"], tiny_model_dir, label_flip_rate=0.25, seed=0, **kw)
    b = setup_dm(pair_files["train"], tiny_model_dir, label_flip_rate=0.25, seed=0, **kw)
    c = setup_dm(pair_files["train"], tiny_model_dir, label_flip_rate=0.25, seed=1, **kw)
    n = len(tiny_task["train"])
    flips_a, flips_b, flips_c = (_flipped(base.train_dataset, dm.train_dataset) for dm in (a, b, c))
    assert len(flips_a) == len(flips_c) == round(0.25 * n) == 24
    assert flips_a == flips_b and flips_a != flips_c
    for dm in (a, b, c):
        assert as_tuples(dm.val_dataset) == as_tuples(base.val_dataset)  # validation never flipped


def test_label_flipping_with_val_fraction_spares_validation(pair_files, tiny_model_dir):
    kw = dict(val_fraction=0.25, seed=3, **SCORES)
    base = setup_dm(pair_files["train"], tiny_model_dir, **kw)
    flipped = setup_dm(pair_files["train"], tiny_model_dir, label_flip_rate=0.5, **kw)
    assert as_tuples(flipped.val_dataset) == as_tuples(base.val_dataset)
    assert len(_flipped(base.train_dataset, flipped.train_dataset)) == round(0.5 * len(base.train_dataset))


def test_label_flipping_rejects_bad_settings(pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match="label_flip_rate"):
        make_dm(pair_files["train"], tiny_model_dir, label_flip_rate=1.5)
    with pytest.raises(ValueError, match="needs preference pairs"):
        setup_dm(pair_files["sft"], tiny_model_dir, rejected_column=None, label_flip_rate=0.1)


# --- 6. val_fraction ---------------------------------------------------------------------------


def test_val_fraction_split(pair_files, tiny_task, tiny_model_dir):
    full = setup_dm(pair_files["train"], tiny_model_dir)
    a = setup_dm(pair_files["train"], tiny_model_dir, val_fraction=0.25, seed=0)
    b = setup_dm(pair_files["train"], tiny_model_dir, val_fraction=0.25, seed=0)
    c = setup_dm(pair_files["train"], tiny_model_dir, val_fraction=0.25, seed=1)
    n = len(tiny_task["train"])
    assert len(a.val_dataset) == round(0.25 * n) and len(a.train_dataset) + len(a.val_dataset) == n
    train, val = as_tuples(a.train_dataset), as_tuples(a.val_dataset)
    assert not set(train) & set(val)
    assert Counter(train + val) == Counter(as_tuples(full.train_dataset))
    assert as_tuples(b.val_dataset) == val and as_tuples(b.train_dataset) == train
    assert set(as_tuples(c.val_dataset)) != set(val)
    batch = next(iter(a.val_dataloader()))
    assert batch["chosen_input_ids"].shape[0] == min(8, len(val))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_out_of_range(fraction, pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        make_dm(pair_files["train"], tiny_model_dir, val_fraction=fraction)


def test_val_file_and_val_fraction_conflict(pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match="either val_file or val_fraction"):
        make_dm(pair_files["train"], tiny_model_dir, val_file=str(pair_files["val"]), val_fraction=0.1)


# --- 7. caching --------------------------------------------------------------------------------


def test_cache_reuse_and_invalidation(rows, tmp_path, tiny_model_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    cache = tmp_path / "cache"
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    calls = []
    original = building.tokenize_pairs

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(building, "tokenize_pairs", counting)

    def run(max_length=32):
        calls.clear()
        dm = make_dm(train, tiny_model_dir, cache_dir=str(cache), max_prompt_length=8, max_length=max_length)
        dm.prepare_data()  # Lightning's order: prepare_data (tokenize + cache), then setup
        dm.setup("fit")
        return dm, len(calls)

    first, n = run()
    assert n == 1
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and ".tmp" not in entries[0]

    def boom(*args, **kwargs):
        raise AssertionError("tokenize_pairs must not run on a cache hit")

    monkeypatch.setattr(building, "tokenize_pairs", boom)
    caplog.clear()
    second = make_dm(train, tiny_model_dir, cache_dir=str(cache), max_prompt_length=8, max_length=32, batch_size=3)
    second.prepare_data()
    second.setup("fit")
    assert as_tuples(second.train_dataset) == as_tuples(first.train_dataset)
    assert any("loading tokenized data from cache" in r.getMessage() for r in caplog.records)
    assert len(list(cache.iterdir())) == 1  # batch_size does not change the key

    monkeypatch.setattr(building, "tokenize_pairs", counting)
    _, n = run(max_length=33)  # a setting change
    assert n == 1 and len(list(cache.iterdir())) == 2

    changed = [dict(r) for r in rows]
    changed[0]["chosen"] = " a totally different and much longer answer than before."
    write_jsonl(train, changed)  # a content change (same path)
    third, n = run()
    assert n == 1 and len(list(cache.iterdir())) == 3
    assert third.train_dataset[0]["chosen_ids"] != first.train_dataset[0]["chosen_ids"]
    assert as_tuples(third.train_dataset)[1:] == as_tuples(first.train_dataset)[1:]


def test_no_cache_dir_writes_nothing(pair_files, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = make_dm(pair_files["train"], tiny_model_dir, cache_dir=None)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_path() is None and list(tmp_path.iterdir()) == []


# --- 8. collator -------------------------------------------------------------------------------


def test_collator_exact_tensors():
    examples = [
        {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 10, 11, 2], "chosen_score": 0.5,
         "rejected_score": -1.0},
        {"prompt_ids": [1, 5], "chosen_ids": [7], "rejected_ids": [8, 2], "chosen_score": 1.5, "rejected_score": 2.0},
    ]
    batch = PairCollator(pad_token_id=3)(examples)
    pad, ign = 3, IGNORE_INDEX
    assert batch["chosen_input_ids"].tolist() == [[1, 5, 6, 7, 2, pad, pad, pad], [1, 5, 7, pad, pad, pad, pad, pad]]
    assert batch["rejected_input_ids"].tolist() == [[1, 5, 6, 8, 9, 10, 11, 2], [1, 5, 8, 2, pad, pad, pad, pad]]
    assert batch["chosen_attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    assert batch["rejected_attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert batch["chosen_labels"].tolist() == [[ign] * 3 + [7, 2] + [ign] * 3, [ign] * 2 + [7] + [ign] * 5]
    assert batch["rejected_labels"].tolist() == [[ign] * 3 + [8, 9, 10, 11, 2], [ign] * 2 + [8, 2] + [ign] * 4]
    assert batch["chosen_score"].tolist() == [0.5, 1.5] and batch["rejected_score"].tolist() == [-1.0, 2.0]
    assert batch["chosen_score"].dtype == torch.float32 and batch["chosen_input_ids"].dtype == torch.long


def test_dataloader_pads_dynamically(pair_files, tiny_model_dir, tok):
    dm = setup_dm(pair_files["train"], tiny_model_dir, val_file=str(pair_files["val"]), eval_batch_size=5,
                  max_length=1024, **SCORES)
    batch = next(iter(dm.val_dataloader()))  # not shuffled: rows 0..4 of the validation set
    examples = [dm.val_dataset[i] for i in range(5)]
    longest = max(len(ex["prompt_ids"]) + len(ex[k]) for ex in examples for k in ("chosen_ids", "rejected_ids"))
    for k in ("chosen", "rejected"):
        ids, mask, labels = batch[f"{k}_input_ids"], batch[f"{k}_attention_mask"], batch[f"{k}_labels"]
        assert ids.shape == mask.shape == labels.shape == (5, longest) and longest < 1024
        for row, ex in enumerate(examples):
            p, r = ex["prompt_ids"], ex[f"{k}_ids"]
            n = len(p) + len(r)
            assert ids[row, :n].tolist() == p + r
            assert (ids[row, n:] == tok.pad_token_id).all() and mask[row].tolist() == [1] * n + [0] * (longest - n)
            assert (labels[row, : len(p)] == IGNORE_INDEX).all() and (labels[row, n:] == IGNORE_INDEX).all()
            assert labels[row, len(p):n].tolist() == r
    assert batch["chosen_score"].shape == (5,)
    assert batch["chosen_score"].tolist() == pytest.approx([ex["chosen_score"] for ex in examples])
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["chosen_input_ids"].shape[0] == 8


def test_list_valued_scores(rows, tmp_path, tiny_model_dir):
    ensemble = [dict(r, oracle_chosen=[r["oracle_chosen"], 0.0, 1.0], oracle_rejected=[r["oracle_rejected"], 0.5, -1.0])
                for r in rows]
    dm = setup_dm(write_jsonl(tmp_path / "ens.jsonl", ensemble), tiny_model_dir, batch_size=4, **SCORES)
    assert dm.train_dataset[0]["chosen_score"] == [rows[0]["oracle_chosen"], 0.0, 1.0]
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_score"].shape == batch["rejected_score"].shape == (4, 3)
    assert batch["rejected_score"][:, 2].tolist() == [-1.0] * 4


# --- 9. bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "missing.csv", "missing.parquet", "a/b/missing"])
def test_missing_file(name, tmp_path, tiny_model_dir, pair_files):
    path = tmp_path / name
    with pytest.raises(FileNotFoundError, match="missing"):
        setup_dm(path, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="missing"):
        setup_dm(pair_files["train"], tiny_model_dir, val_file=str(path))


def test_malformed_json(rows, tmp_path, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + '{"prompt": "x", "chosen": \n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: malformed JSON")):
        setup_dm(path, tiny_model_dir)
    path.write_text(json.dumps(rows[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 2: expected a JSON object")):
        setup_dm(path, tiny_model_dir)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows[:2])[:-5])
    with pytest.raises(DataError, match=re.escape(f"{path}: malformed JSON")):
        setup_dm(path, tiny_model_dir)
    path.write_text(json.dumps({"rows": rows[:2]}))
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        setup_dm(path, tiny_model_dir)


def test_missing_score_column(pair_files, tiny_model_dir):
    with pytest.raises(DataError) as e:
        setup_dm(pair_files["train"], tiny_model_dir, chosen_score_column="reward_a", rejected_score_column="reward_b")
    msg = str(e.value)
    assert "missing column(s) ['reward_a', 'reward_b']" in msg and "'gold_chosen'" in msg and "'prompt'" in msg


BAD_VALUES = [
    ("prompt", None, "null"),
    ("prompt", "", "empty"),
    ("prompt", "   ", "empty"),
    ("chosen", 5, "got int"),
    ("chosen", {"text": "x"}, "got dict"),
    ("rejected", ["x"], "got list"),
    ("rejected", "SAME", "identical"),
    ("oracle_chosen", "abc", "finite number"),
    ("oracle_chosen", float("nan"), "finite number"),  # json.dumps writes NaN, which json.loads accepts
    ("oracle_rejected", float("inf"), "finite number"),
    ("oracle_rejected", None, "finite number"),
    ("oracle_rejected", True, "finite number"),
    ("oracle_chosen", [], "non-empty list"),
    ("oracle_chosen", [0.1, "x"], "finite number"),
]


@pytest.mark.parametrize("field,value,expect", BAD_VALUES)
def test_bad_field_values_name_file_row_and_field(field, value, expect, rows, tmp_path, tiny_model_dir):
    bad = [dict(r) for r in rows[:4]]
    if value == "SAME":
        value = bad[2]["chosen"]
    bad[2][field] = value
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    if isinstance(value, float) and value != value:
        assert "NaN" in path.read_text()  # not valid JSON, but Python's json reads it
    with pytest.raises(DataError) as e:
        setup_dm(path, tiny_model_dir, **SCORES)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg and f"field {field!r}" in msg and expect in msg
    assert "on_bad_row skip" in msg


def test_skip_bad_rows(rows, tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    good = [dict(r) for r in rows[:6]]
    bad = [
        dict(rows[6], prompt=None),
        dict(rows[7], chosen=""),
        dict(rows[8], rejected=rows[8]["chosen"]),
        dict(rows[9], oracle_chosen=float("nan")),
        dict(rows[10], oracle_rejected="n/a"),
        dict(rows[11], chosen=7),
    ]
    mixed = [good[0], bad[0], good[1], good[2], bad[1], bad[2], good[3], bad[3], bad[4], good[4], bad[5], good[5]]
    path = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    dm = setup_dm(path, tiny_model_dir, on_bad_row="skip", **SCORES)
    reference = setup_dm(write_jsonl(tmp_path / "good.jsonl", good), tiny_model_dir, **SCORES)
    assert as_tuples(dm.train_dataset) == as_tuples(reference.train_dataset)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert warnings[0].args[1] == 6
    assert warnings[0].args[2] == {
        "null_field": 1, "empty_field": 1, "identical_responses": 1, "bad_score": 2, "not_a_string": 1
    }
    with pytest.raises(DataError, match="no usable rows"):
        setup_dm(write_jsonl(tmp_path / "allbad.jsonl", bad), tiny_model_dir, on_bad_row="skip", **SCORES)


def test_sft_mode(pair_files, tiny_task, tiny_model_dir, tok):
    dm = setup_dm(pair_files["sft"], tiny_model_dir, rejected_column=None, val_fraction=0.25, batch_size=4)
    ex = dm.train_dataset[0]
    assert set(ex) == {"prompt_ids", "chosen_ids"}
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(tiny_task["sft"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"chosen_input_ids", "chosen_attention_mask", "chosen_labels"}
    first = setup_dm(pair_files["sft"], tiny_model_dir, rejected_column=None).train_dataset[0]
    row = tiny_task["sft"][0]
    assert first["prompt_ids"] == tok(row["prompt"])["input_ids"]
    assert first["chosen_ids"] == tok(row["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


# --- 10. tokenizer without a pad token ---------------------------------------------------------


def test_tokenizer_without_pad_token(pair_files, tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "nopad")).pad_token_id is None
    dm = setup_dm(pair_files["train"], tiny_model_dir, tokenizer=str(tmp_path / "nopad"), val_file=str(pair_files["val"]),
                  eval_batch_size=6)
    eos = dm.tokenizer.eos_token_id
    assert dm.tokenizer.pad_token_id == eos and eos is not None
    batch = next(iter(dm.val_dataloader()))
    mask, ids, labels = batch["chosen_attention_mask"], batch["chosen_input_ids"], batch["chosen_labels"]
    assert (mask == 0).any()
    assert (ids[mask == 0] == eos).all() and (labels[mask == 0] == IGNORE_INDEX).all()
    # The real EOS that ends each response stays a label; only padding is masked.
    lengths = mask.sum(1)
    for row in range(ids.shape[0]):
        assert labels[row, lengths[row] - 1].item() == eos


# --- 11. tokenizers as they come --------------------------------------------------------------


def test_tokenizer_without_bos_adds_no_prefix_and_truncates_from_the_left(pair_files, tiny_task, tiny_model_dir, tmp_path):
    """Qwen's tokenizers have no BOS: nothing is prepended and truncation keeps the prompt's end."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    backend = tok.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, pad_token=tok.pad_token)
    no_bos.save_pretrained(tmp_path / "no_bos")
    dm = setup_dm(pair_files["train"], tiny_model_dir, tokenizer=str(tmp_path / "no_bos"), max_prompt_length=4)
    assert dm.tokenizer.bos_token_id is None
    for ex, row in zip(dm.train_dataset, tiny_task["train"]):
        full = no_bos(row["prompt"], add_special_tokens=True)["input_ids"]
        assert ex["prompt_ids"] == full[-4:]
        assert tok.bos_token_id not in ex["prompt_ids"]


def test_chat_template_with_its_own_bos_gets_no_second_one(tmp_path, tiny_model_dir, tok):
    rows = trl_rows()
    dm = setup_dm(write_jsonl(tmp_path / "conv.jsonl", rows), tiny_model_dir, chat_template="{{ bos_token }}" + TEMPLATE)
    for ex in dm.train_dataset:
        assert ex["prompt_ids"][0] == tok.bos_token_id and ex["prompt_ids"].count(tok.bos_token_id) == 1
        assert tok.bos_token_id not in ex["chosen_ids"] + ex["rejected_ids"]


def test_prompts_ending_in_whitespace_are_counted_in_a_warning(rows, tmp_path, tiny_model_dir, caplog):
    spaced = [dict(r, prompt=r["prompt"] + " ") if i < 3 else r for i, r in enumerate(rows)]
    with caplog.at_level(logging.WARNING, logger="drdo_lightning.data"):
        setup_dm(write_jsonl(tmp_path / "spaced.jsonl", spaced), tiny_model_dir)
    (message,) = [r.getMessage() for r in caplog.records if "whitespace" in r.getMessage()]
    assert message.startswith(f"3 of {len(rows)} prompts end in whitespace")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drdo_lightning.data"):
        setup_dm(write_jsonl(tmp_path / "clean.jsonl", rows), tiny_model_dir)
    assert not [r for r in caplog.records if "whitespace" in r.getMessage()]


def test_shuffle_order_does_not_depend_on_the_default_device():
    """Lightning's DeepSpeed set-up builds the loader while the GPU is the default device."""
    sampler = ResumableSampler(list(range(20)), num_replicas=1, rank=0, shuffle=True, seed=3)
    expected = sampler.order()
    with torch.device("meta"):  # stands in for CUDA on a machine without one: any non-CPU default
        assert sampler.order() == expected
