"""Collation: exact batch tensors, dynamic padding, list-valued scores."""

from __future__ import annotations

import pytest
import torch
from data_support import SCORES, rows, setup_dm, tok  # noqa: F401 (fixtures)

from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.tokenization import IGNORE_INDEX
from drdo_lightning.jsonl import write_jsonl

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
