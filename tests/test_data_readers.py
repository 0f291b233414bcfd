"""Reading rows: every input format, configurable column names."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from data_support import SCORES, as_tuples, hf_cache, make_dm, reference_pair, rows, setup_dm, tok, write_csv  # noqa: F401 (fixtures)

from drdo_lightning.errors import DataError
from drdo_lightning.jsonl import write_jsonl

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
