"""Batch order: length grouping and a sampler and loader that resume mid-epoch."""

from __future__ import annotations

import os
import random

import datasets
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, DistributedSampler

from drdo_lightning.errors import DataError


def sequence_lengths(ds: datasets.Dataset) -> list[tuple[int, ...]]:
    """Per example, the token length of ``prompt + chosen`` (and of ``prompt + rejected``)."""
    table = ds.with_format("arrow")[:]
    prompt = pc.list_value_length(table["prompt_ids"])
    responses = [k for k in ("chosen_ids", "rejected_ids") if k in table.column_names]
    sides = [pc.add(prompt, pc.list_value_length(table[k])).to_pylist() for k in responses]
    return list(zip(*sides))


def held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(training rows, validation rows)`` of ``n`` rows: ``fraction`` of them (at least one) drawn
    with ``seed`` to validate on, the others in shuffled order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise DataError(f"val_fraction={fraction} leaves no training rows out of {n}")
    return order[n_val:], order[:n_val]


def group_by_length(indices: list[int], lengths: list[int], batch_size: int, seed: int, window: int = 64) -> list[int]:
    """Reorder ``indices`` so that each run of ``batch_size`` holds examples of similar length.

    Each stretch of ``window`` batches of the (shuffled) order is sorted by length and cut into
    batches, whose order within the stretch is then shuffled: batches pad little, and the
    training order stays random beyond a stretch. A short last batch stays last.
    """
    rng = random.Random(seed)
    out: list[int] = []
    for i in range(0, len(indices), batch_size * window):
        stretch = sorted(indices[i : i + batch_size * window], key=lengths.__getitem__)
        batches = [stretch[j : j + batch_size] for j in range(0, len(stretch), batch_size)]
        short = [batches.pop()] if len(batches[-1]) < batch_size else []
        rng.shuffle(batches)
        out.extend(index for batch in batches + short for index in batch)
    return out


def padding_fraction(lengths: list[tuple[int, ...]], order: list[int], batch_size: int) -> float:
    """Share of padding among the tokens the collator builds for batches taken in ``order``
    (chosen and rejected share one padded length per batch)."""
    padded = real = 0
    for i in range(0, len(order), batch_size):
        rows = [lengths[j] for j in order[i : i + batch_size]]
        padded += max(map(max, rows)) * len(rows) * len(rows[0])
        real += sum(map(sum, rows))
    return 1.0 - real / max(padded, 1)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s seeded per-epoch shuffle (split across ranks) that can start mid-epoch.

    ``start`` skips that many of this rank's items in the next pass only; it is set when a run
    resumes (see :class:`ResumableDataLoader`). With ``lengths`` set (the longer side of each
    pair), the order is grouped by length (:func:`group_by_length`, seeded per epoch like the
    shuffle, so a resumed run sees the same batches) before it is split across ranks: the global
    order is grouped for global batches of ``batch_size`` x ranks, and rank r takes the r-th of
    every ``num_replicas`` items, as without grouping. So the ranks' batches at a step are together
    the batch one process with the global batch size sees at that step.
    """

    start = 0
    lengths: list[int] | None = None
    batch_size = 1

    def order(self) -> list[int]:
        """This rank's items for the current epoch, in order."""
        # The shuffle draws from a CPU generator. Lightning's DeepSpeed set-up asks for the loader
        # while the GPU is the default device, where randperm would refuse a CPU generator.
        with torch.device("cpu"):
            if self.lengths is None:
                return list(super().__iter__())
            everyone = self.global_order()
        grouped = group_by_length(everyone, self.lengths, self.batch_size * self.num_replicas, seed=self.seed + self.epoch)
        return grouped[self.rank :: self.num_replicas]

    def global_order(self) -> list[int]:
        """Every rank's items of this epoch before the split, in the order they are split in
        (``DistributedSampler`` gives rank r the items r, r + ranks, ...)."""
        shares = []
        for rank in range(self.num_replicas):
            share = DistributedSampler(self.dataset, self.num_replicas, rank, self.shuffle, self.seed, self.drop_last)
            share.set_epoch(self.epoch)
            shares.append(list(iter(share)))
        return [index for step in zip(*shares) for index in step]

    def __iter__(self):
        indices = self.order()
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader (with a :class:`ResumableSampler`) whose place in the epoch survives a restart.

    Lightning saves ``state_dict()`` of a training loader that has one in each checkpoint, and
    :class:`PreferenceDataModule` saves it too; ``load_state_dict()`` before iterating again makes a
    run resumed mid-epoch see the same remaining batches as an uninterrupted one. Batches are
    counted here, as the training loop takes them, not in the sampler, which workers read ahead of
    training.
    """

    _batches = 0  # batches of the current epoch handed out so far

    def __iter__(self):
        self._batches = self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):  # saved at the end of an epoch: resume at the start of the next
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = batches * self.batch_size
        self._batches = batches  # what state_dict says until iterating again: the place loaded


def shuffled_loader(data, batch_size: int, *, world: int = 1, rank: int = 0,
                    loader: type[ResumableDataLoader] = ResumableDataLoader, **kwargs) -> ResumableDataLoader:
    """``loader`` over ``data`` shuffled per epoch from seed_everything's seed (as Lightning's own
    distributed sampler is), split across ``world`` ranks, and resumable mid-epoch."""
    sampler = ResumableSampler(data, num_replicas=world, rank=rank, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
    return loader(data, sampler=sampler, batch_size=batch_size, **kwargs)
