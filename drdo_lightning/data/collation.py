"""Collation: tokenized pairs into padded batch tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drdo_lightning.data.tokenization import IGNORE_INDEX

# Per-example numbers the collator passes through as float tensors: Oracle scores ([B] or
# [B, K] for an ensemble) and precomputed reference log-probs.
FLOAT_COLUMNS = ("chosen_score", "rejected_score", "ref_chosen_logps", "ref_rejected_logps")

@dataclass
class PairCollator:
    """Pads a batch dynamically (to its own longest sequence) on the right.

    Chosen and rejected share one padded length so a module can concatenate them into one
    ``[2B, T]`` forward. Labels are the input ids with prompt and padding positions set to
    ``IGNORE_INDEX``.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        keys = [k for k in ("chosen", "rejected") if f"{k}_ids" in examples[0]]
        length = max(len(ex["prompt_ids"]) + len(ex[f"{k}_ids"]) for ex in examples for k in keys)
        batch: dict[str, torch.Tensor] = {}
        for k in keys:
            ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
            labels = torch.full_like(ids, IGNORE_INDEX)
            mask = torch.zeros_like(ids)
            for row, ex in enumerate(examples):
                p, r = ex["prompt_ids"], ex[f"{k}_ids"]
                n = len(p) + len(r)
                ids[row, :n] = torch.tensor(p + r)
                labels[row, len(p):n] = torch.tensor(r)
                mask[row, :n] = 1
            batch[f"{k}_input_ids"], batch[f"{k}_attention_mask"], batch[f"{k}_labels"] = ids, mask, labels
        for k in FLOAT_COLUMNS:
            if k in examples[0]:
                batch[k] = torch.tensor([ex[k] for ex in examples], dtype=torch.float32)
        return batch
