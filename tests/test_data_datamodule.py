"""The data module: validation split, caching, and the shuffle order."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from data_support import (
    as_tuples,
    make_dm,
    rows,  # noqa: F401 (fixtures)
    setup_dm,
)
from jsonargparse import ArgumentParser

from drdo_lightning.data import PreferenceDataModule, building
from drdo_lightning.data.sampling import ResumableSampler
from drdo_lightning.jsonl import write_jsonl

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


def test_every_load_warns_once_of_what_it_lost_a_cached_one_too(rows, tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    train = write_jsonl(tmp_path / "train.jsonl", rows)

    def load() -> tuple[list[str], list[str]]:
        """The warnings and the other messages of one load as Lightning runs it."""
        caplog.clear()
        dm = make_dm(train, tiny_model_dir, cache_dir=str(tmp_path / "cache"), max_prompt_length=8, max_length=32)
        dm.prepare_data()
        dm.setup("fit")
        messages = [(r.levelno, r.getMessage()) for r in caplog.records]
        return [m for level, m in messages if level >= logging.WARNING], [m for level, m in messages if level < logging.WARNING]

    built, _ = load()
    (warning,) = built  # once, though prepare_data builds and setup then reads the cache
    assert warning.startswith("train split: ") and "truncated" in warning
    reused, infos = load()
    assert reused == [f"{warning} (tokenized data from the cache)"]  # what was lost is news at every load
    assert any(m.startswith("loading tokenized data from cache") for m in infos)  # a neutral fact: INFO


def test_the_cache_of_a_glob_follows_the_files_it_matches(rows, tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train-0.jsonl", rows[:8])
    write_jsonl(tmp_path / "train-1.jsonl", rows[8:])

    def load() -> list[tuple]:
        dm = make_dm(tmp_path / "train-*.jsonl", tiny_model_dir, cache_dir=str(tmp_path / "cache"))
        dm.prepare_data()
        dm.setup("fit")
        return as_tuples(dm.train_dataset)

    both = load()
    assert len(both) == len(rows) and load() == both
    write_jsonl(tmp_path / "train-1.jsonl", rows[8:12])  # a matched file changed
    assert len(load()) == 12
    write_jsonl(tmp_path / "train-2.jsonl", rows[12:])  # a file newly matched
    assert len(load()) == len(rows)


def test_no_cache_dir_writes_nothing(pair_files, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = make_dm(pair_files["train"], tiny_model_dir, cache_dir=None)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_path() is None and list(tmp_path.iterdir()) == []



def test_shuffle_order_does_not_depend_on_the_default_device():
    """Lightning's DeepSpeed set-up builds the loader while the GPU is the default device."""
    sampler = ResumableSampler(list(range(20)), num_replicas=1, rank=0, shuffle=True, seed=3)
    expected = sampler.order()
    with torch.device("meta"):  # stands in for CUDA on a machine without one: any non-CPU default
        assert sampler.order() == expected


def test_prompt_column_null_on_the_command_line_means_no_prompt_column():
    parser = ArgumentParser()
    parser.add_class_arguments(PreferenceDataModule, "data")
    argv = ["--data.train_file", "d.jsonl", "--data.tokenizer", "t"]
    assert parser.parse_args([*argv, "--data.prompt_column", "null"]).data.prompt_column is None
    assert parser.parse_args(argv).data.prompt_column == "prompt"


@pytest.mark.parametrize("ranks", [2, 3])
def test_length_grouping_happens_before_the_split_across_processes(ranks):
    """At every step the ranks' grouped batches are together the batch one process sees with the
    global batch size, so grouping keeps multi-process runs equal to one process."""
    n, batch = 60, 4
    lengths = [(i * 37) % 23 for i in range(n)]

    def sampler(replicas: int, rank: int, per_rank_batch: int) -> ResumableSampler:
        s = ResumableSampler(list(range(n)), num_replicas=replicas, rank=rank, shuffle=True, seed=5)
        s.lengths, s.batch_size = lengths, per_rank_batch
        s.set_epoch(2)
        return s

    single = sampler(1, 0, batch * ranks).order()
    shares = [sampler(ranks, r, batch).order() for r in range(ranks)]
    for step in range(n // (batch * ranks)):
        together = [i for share in shares for i in share[step * batch:(step + 1) * batch]]
        assert sorted(together) == sorted(single[step * batch * ranks:(step + 1) * batch * ranks])
    assert single != list(range(n)) and padding_spread(single, lengths, batch * ranks) < padding_spread(
        sampler(1, 0, batch * ranks).global_order(), lengths, batch * ranks)  # grouped: less spread per batch


def padding_spread(order: list[int], lengths: list[int], batch: int) -> int:
    """Sum over batches of (longest - shortest): what padding grows with."""
    return sum(max(lengths[i] for i in order[j:j + batch]) - min(lengths[i] for i in order[j:j + batch])
               for j in range(0, len(order), batch))
