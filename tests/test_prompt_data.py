"""The online mode's data: prompts read alone from every layout pairs come in, their batches, and the
offline pairs mixed into them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from data_support import (  # noqa: F401 (fixtures)
    QUESTIONS,
    SCORES,
    TEMPLATE,
    as_tuples,
    make_dm,
    setup_dm,
    trl_rows,
    ultrafeedback_rows,
    write_csv,
)

from drdo_lightning.cli import main
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.pairs import Columns
from drdo_lightning.data.prompts import load_prompts, offline_pairs_per_batch
from drdo_lightning.errors import DataError, SettingError
from drdo_lightning.jsonl import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def distinct(values: list) -> list:
    """``values`` without repeats, in the order first seen (conversations compared by value)."""
    out = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def epoch(loader) -> list[dict]:
    return list(loader)


# --- reading prompts ---------------------------------------------------------------------------


def test_a_prompt_only_file_gives_each_prompt_once(tmp_path, caplog):
    rows = [{"prompt": "Say hi."}, {"prompt": CHAT}, {"prompt": "Say hi."}, {"prompt": "Count to three."},
            {"prompt": [dict(m) for m in CHAT]}]
    with caplog.at_level(logging.INFO, logger="drdo_lightning.data"):
        prompts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)), Columns())
    assert prompts == ["Say hi.", CHAT, "Count to three."]
    (record,) = [r for r in caplog.records if "repeat an earlier prompt" in r.getMessage()]
    assert record.levelno == logging.WARNING and "2 of 5 rows repeat" in record.getMessage()


def test_a_pairs_file_gives_its_prompts_once_and_counts_the_repeats(pair_files, tiny_task, caplog):
    with caplog.at_level(logging.INFO, logger="drdo_lightning.data"):
        prompts = load_prompts(str(pair_files["train"]), Columns())
    expected = distinct([row["prompt"] for row in tiny_task["train"]])
    assert prompts == expected and len(expected) < len(tiny_task["train"])  # the task repeats some prompts
    (record,) = [r for r in caplog.records if "repeat an earlier prompt" in r.getMessage()]
    repeats = len(tiny_task["train"]) - len(expected)
    assert record.levelno == logging.INFO
    assert f"{repeats} of {len(tiny_task['train'])} pairs repeat" in record.getMessage()


@pytest.mark.parametrize("layout", ["ultrafeedback", "trl"])
def test_conversational_pairs_give_the_conversation_so_far(layout, tmp_path):
    # Ultrafeedback: chosen is the whole conversation, its last assistant turn the answer; TRL: the prompt column.
    rows = ultrafeedback_rows() if layout == "ultrafeedback" else trl_rows()
    prompts = load_prompts(str(write_jsonl(tmp_path / "c.jsonl", rows)), Columns())
    assert prompts == [[{"role": "user", "content": q}] for q, _, _ in QUESTIONS]


def test_a_multi_turn_conversation_and_an_implicit_prompt(tmp_path):
    history = [*CHAT, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    turns = {k: [*history, {"role": "assistant", "content": answer}] for k, answer in (("chosen", "Red."), ("rejected", "No."))}
    # Whole conversations in chosen and rejected, no prompt column: the prompt is what they share.
    assert load_prompts(str(write_jsonl(tmp_path / "m.jsonl", [turns])), Columns(prompt=None)) == [history]
    assert load_prompts(str(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "ignored", **turns}])), Columns()) == [history]
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    assert load_prompts(str(write_jsonl(tmp_path / "hh.jsonl", [hh])), Columns(prompt=None)) == ["\n\nHuman: Hi?\n\nAssistant:"]


def test_csv_pairs_and_prompts(tmp_path, tiny_task):
    rows = tiny_task["train"][:12]
    pairs = write_csv(tmp_path / "pairs.csv", rows)
    assert load_prompts(str(pairs), Columns(chosen_score="oracle_chosen", rejected_score="oracle_rejected")) == \
        distinct([r["prompt"] for r in rows])
    alone = write_csv(tmp_path / "prompts.csv", [{"question": r["prompt"]} for r in rows])
    assert load_prompts(str(alone), Columns(prompt="question")) == distinct([r["prompt"] for r in rows])


def test_a_bad_row_is_named_or_skipped_and_counted(tmp_path, caplog):
    rows = [{"prompt": "Fine."}, {"prompt": "  "}, {"prompt": [{"role": "assistant", "content": "x"}]}, {"prompt": "Ok."}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: field 'prompt': expected a non-empty string.*"
                                        r"2 of 4 rows are bad, by reason: \{'empty_field': 1, 'bad_roles': 1\}"):
        load_prompts(str(path), Columns())
    with caplog.at_level(logging.WARNING, logger="drdo_lightning.data"):
        assert load_prompts(str(path), Columns(), on_bad_row="skip") == ["Fine.", "Ok."]
    assert any("skipped 2 bad rows" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt'\]; the data has columns \['question'\]"):
        load_prompts(str(write_jsonl(tmp_path / "q.jsonl", [{"question": "Hi?"}])), Columns())


# --- batches -----------------------------------------------------------------------------------


def test_prompt_batches_are_shuffled_with_the_seed_and_hold_every_prompt(pair_files, tiny_task, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    dm = setup_dm(pair_files["train"], tiny_model_dir, prompts_only=True, batch_size=8, val_file=str(pair_files["val"]),
                  eval_batch_size=5)
    assert dm.train_dataset is None and not dm.has_split("train")  # no pairs without an offline_file
    batches = epoch(dm.train_dataloader())
    assert all(set(b) == {"prompts"} and isinstance(b["prompts"], list) for b in batches)
    assert [len(b["prompts"]) for b in batches[:-1]] == [8] * (len(batches) - 1)
    seen = [p for b in batches for p in b["prompts"]]
    assert sorted(seen) == sorted(dm.train_prompts) == sorted(distinct([r["prompt"] for r in tiny_task["train"]]))
    assert seen != dm.train_prompts  # shuffled
    again = setup_dm(pair_files["train"], tiny_model_dir, prompts_only=True, batch_size=8)
    assert [p for b in epoch(again.train_dataloader()) for p in b["prompts"]] == seen
    val = epoch(dm.val_dataloader())
    assert [p for b in val for p in b["prompts"]] == distinct([r["prompt"] for r in tiny_task["val"]])  # in order
    assert len(val[0]["prompts"]) == 5


def test_val_fraction_holds_out_prompts(pair_files, tiny_model_dir):
    dm = setup_dm(pair_files["train"], tiny_model_dir, prompts_only=True, val_fraction=0.25)
    whole = setup_dm(pair_files["train"], tiny_model_dir, prompts_only=True)
    assert len(dm.val_prompts) == round(0.25 * len(whole.train_prompts))
    assert sorted(dm.train_prompts + dm.val_prompts) == sorted(whole.train_prompts)


@pytest.mark.parametrize(("batch_size", "share", "n_off"), [(8, 0.2, 2), (4, 0.5, 4), (6, 0.25, 2)])
def test_offline_pairs_are_their_share_of_each_step(batch_size, share, n_off, pair_files, pairs16, tiny_model_dir):
    assert offline_pairs_per_batch(batch_size, share) == n_off
    dm = setup_dm(pair_files["train"], tiny_model_dir, prompts_only=True, batch_size=batch_size, offline_file=str(pairs16),
                  offline_share=share, **SCORES)
    batches = epoch(dm.train_dataloader())
    full = [b for b in batches if len(b["prompts"]) == batch_size]
    assert len(full) >= len(batches) - 1
    for b in batches:  # a short last batch of prompts still carries the offline pairs of a batch
        assert b["chosen_input_ids"].shape[0] == b["rejected_input_ids"].shape[0] == b["chosen_score"].shape[0] == n_off
    for b in full:
        assert n_off / (batch_size + n_off) == pytest.approx(share, abs=0.5 / (batch_size + n_off))


def test_offline_pairs_are_the_pair_modules_and_run_through_its_epochs(pair_files, pairs16, tiny_model_dir):
    pairs = setup_dm(pairs16, tiny_model_dir, **SCORES)
    dm = setup_dm(pair_files["train"], tiny_model_dir, prompts_only=True, batch_size=8, offline_file=str(pairs16),
                  offline_share=1 / 3, **SCORES)
    assert as_tuples(dm.train_dataset) == as_tuples(pairs.train_dataset)  # tokenized by the same pipeline
    loader = dm.train_dataloader()
    offline = loader.offline
    collate = PairCollator(pairs.tokenizer.pad_token_id)
    orders = []
    for _ in range(3):  # the 12 batches of prompts take three offline epochs of 16 / 4 batches
        offline.sampler.set_epoch(len(orders))
        orders.append(offline.sampler.order())
    offline.sampler.set_epoch(0)
    batches = epoch(loader)
    assert len(batches) == 12
    for i, b in enumerate(batches):
        order = orders[i // 4]
        expected = collate([pairs.train_dataset[j] for j in order[(i % 4) * 4:(i % 4 + 1) * 4]])
        for key, value in expected.items():
            assert torch.equal(b[key], value), (i, key)
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == list(range(16))


def test_a_resumed_loader_gives_the_remaining_prompts_and_pairs(pair_files, pairs16, tiny_model_dir):
    def module():
        return setup_dm(pair_files["train"], tiny_model_dir, prompts_only=True, batch_size=8, offline_file=str(pairs16),
                        offline_share=0.2)

    def two_epochs(loader):
        out = []
        for e in (0, 1):
            loader.sampler.set_epoch(e)
            out += list(loader)
        return out

    uninterrupted = two_epochs(module().train_dataloader())
    # The offline pairs run on through the prompts' epochs: every 16 in a row are the 16 pairs, each once.
    pairs = [tuple(ids[mask.bool()].tolist()) for b in uninterrupted
             for ids, mask in zip(b["chosen_input_ids"], b["chosen_attention_mask"])]
    assert len(pairs) == 48 and all(len(set(pairs[i:i + 16])) == 16 for i in range(0, 48, 16))
    loader = module().train_dataloader()
    loader.sampler.set_epoch(0)
    taken = []
    for batch in loader:
        taken.append(batch)
        if len(taken) == 5:
            break
    state = loader.state_dict()
    assert state["offline"] == {"epoch": 0, "batches": 5}  # of 16 / 2 a pass
    resumed_dm = module()
    resumed_dm.load_state_dict({"train_loader": state})
    resumed = resumed_dm.train_dataloader()
    rest = list(resumed)
    resumed.sampler.set_epoch(1)
    rest += list(resumed)
    assert len(taken) + len(rest) == len(uninterrupted)
    for a, b in zip(taken + rest, uninterrupted, strict=True):
        assert a["prompts"] == b["prompts"] and torch.equal(a["chosen_input_ids"], b["chosen_input_ids"])


def test_offline_pairs_are_cached_and_prompts_alone_write_no_cache(pair_files, pairs16, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    alone = make_dm(pair_files["train"], tiny_model_dir, prompts_only=True, cache_dir=str(cache))
    alone.prepare_data()
    alone.setup("fit")
    assert alone.train_prompts and not cache.exists()
    mixed = dict(prompts_only=True, offline_file=str(pairs16), offline_share=0.5, cache_dir=str(cache))
    built = make_dm(pair_files["train"], tiny_model_dir, **mixed)
    built.prepare_data()
    built.setup("fit")
    (folder,) = cache.iterdir()
    loaded = setup_dm(pair_files["train"], tiny_model_dir, **mixed)
    assert loaded.cache_path() == folder and as_tuples(loaded.train_dataset) == as_tuples(built.train_dataset)
    other = make_dm(pair_files["train"], tiny_model_dir, **{**mixed, "offline_file": str(pair_files["val"])})
    assert other.cache_path() != folder  # keyed by the offline pairs' file


def test_too_few_offline_pairs_for_a_batch(pair_files, tiny_model_dir, tmp_path, tiny_task):
    few = write_jsonl(tmp_path / "few.jsonl", tiny_task["train"][:3])
    dm = setup_dm(pair_files["train"], tiny_model_dir, prompts_only=True, batch_size=8, offline_file=str(few),
                  offline_share=0.5)
    with pytest.raises(DataError, match="the offline_file has 3 pairs, fewer than the 8 a batch carries"):
        dm.train_dataloader()


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "named"), [
    (dict(prompts_only=True, offline_share=1.0, offline_file="x.jsonl"), r"offline_share must be in \[0, 1\)"),
    (dict(prompts_only=True, offline_share=-0.1, offline_file="x.jsonl"), r"offline_share must be in \[0, 1\)"),
    (dict(prompts_only=True, offline_share=0.3), "name them with --data.offline_file"),
    (dict(prompts_only=True, offline_file="x.jsonl"), "offline_file x.jsonl is read only with --data.offline_share"),
    (dict(offline_file="x.jsonl", offline_share=0.3), "need --data.prompts_only true"),
    (dict(prompts_only=True, label_flip_rate=0.1), "label_flip_rate: label noise flips"),
    (dict(prompts_only=True, label_noise="bt", noise_margin_column="m"), "label_noise: label noise flips"),
    (dict(prompts_only=True, group_by_length=True), "leave --data.group_by_length false"),
    (dict(prompts_only=True, offline_file="x.jsonl", offline_share=0.3, rejected_column=None), "--data.rejected_column"),
    (dict(prompts_only=True, offline_file="x.jsonl", offline_share=0.05, batch_size=8), r"= 0 offline pairs per batch"),
])
def test_settings_that_do_not_go_together(settings, named, pair_files, tiny_model_dir):
    with pytest.raises(SettingError, match=named) as error:
        make_dm(pair_files["train"], tiny_model_dir, **settings)
    assert "\n" not in str(error.value)


def test_the_command_line_takes_the_online_data_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/drdo.yaml"), "--data.prompts_only", "true",
              "--data.offline_file", "pairs.jsonl", "--data.offline_share", "0.25", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "prompts_only: true" in printed and "offline_file: pairs.jsonl" in printed and "offline_share: 0.25" in printed
