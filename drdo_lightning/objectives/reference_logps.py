"""A frozen reference's log-probs, computed once before training and attached to the data as columns
(``ref_chosen_logps``, ``ref_rejected_logps``), so training holds one model in memory.

The values are cached beside the tokenized data, keyed by the data's cache (data, tokenizer,
truncation), the reference's weights and the log-prob form: a second run on the same data loads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from drdo_lightning.data.columns import ExampleColumns
from drdo_lightning.models import CausalLMWithRewardHead
from drdo_lightning.objectives.outputs import PairOutputs

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def cache_file(data: ExampleColumns, reference: str, average_logps: bool) -> Path | None:
    """Where ``reference``'s log-probs of ``data`` are cached (None when the data has no cache)."""
    data_cache = data.cache_path()
    if data_cache is None:
        return None
    source = Path(reference)
    weights = sorted(source.glob("*.safetensors")) if source.is_dir() else []
    key = json.dumps(
        {
            "reference": str(source.resolve()) if source.exists() else str(source),
            "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
            "average_logps": average_logps,
        }
    )
    return data_cache / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


@torch.no_grad()
def compute(
    data: ExampleColumns,
    reference: CausalLMWithRewardHead,
    forward: Callable[[dict[str, Tensor], CausalLMWithRewardHead], PairOutputs],
    device: torch.device,
) -> dict[str, Tensor]:
    """``{split: [N, 2]}``: ``(z_w^ref, z_l^ref)`` of every example of each loaded split, in dataset order."""
    reference = reference.to(device)
    values = {}
    for split in ("train", "val"):
        if not data.has_split(split):
            continue
        chunks = []
        for batch in data.ordered_dataloader(split):
            out = forward({k: v.to(device) for k, v in batch.items()}, reference)
            chunks.append(torch.stack([out.chosen_logps, out.rejected_logps], dim=-1).float().cpu())
        values[split] = torch.cat(chunks)
    return values


def attach(
    data: ExampleColumns,
    trainer: L.Trainer,
    cache: Path | None,
    compute_values: Callable[[], dict[str, Tensor]],
) -> None:
    """Attach the reference's log-probs to ``data``: loaded from ``cache`` where it exists, else computed
    by ``compute_values`` (on global rank 0 when cached, the others then load the cache)."""
    if cache is None or not cache.exists():
        if cache is None or trainer.is_global_zero:
            with torch.random.fork_rng():  # loading must not shift the seeded RNG streams of training
                values = compute_values()
            if cache is not None:
                staging = cache.with_name(f"{cache.name}.tmp{os.getpid()}")  # runs on the same data may write at once
                torch.save(values, staging)
                staging.replace(cache)
        trainer.strategy.barrier("reference-logps")
    if cache is not None:
        values = torch.load(cache, weights_only=True)
    for split, logps in values.items():
        data.add_columns(split, {COLUMNS[0]: logps[:, 0].tolist(), COLUMNS[1]: logps[:, 1].tolist()})
