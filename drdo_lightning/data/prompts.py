"""Prompts alone, for training online (``PreferenceDataModule(prompts_only=True)``): each step samples
answers to a batch of prompts from the policy and an Oracle scores them into pairs.

Prompts come from every source and layout the pair reader reads (:func:`~drdo_lightning.data.readers.read_rows`):
a file of prompts alone (rows with just a prompt column, text or a conversation to answer), or pairs,
whose prompt is taken as :func:`~drdo_lightning.data.pairs.row_prompt` finds it (a conversation when
the answers are conversations). Prompts stay unrendered: text, or a list of ``{"role", "content"}``
messages that the policy's chat template renders when it samples.

Offline pairs can be mixed in at a share ``s`` of a step's pairs: with one online pair per prompt, a
batch of ``b`` prompts carries ``round(b * s / (1 - s))`` offline pairs (:func:`offline_pairs_per_batch`),
tokenized and collated as the pair data are."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import datasets
from torch.utils.data import DataLoader

from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.pairs import Columns, check_columns, check_prompt, row_prompt, validated_rows
from drdo_lightning.data.sampling import ResumableDataLoader, held_out, shuffled_loader
from drdo_lightning.errors import DataError, SettingError

log = logging.getLogger(__name__)


@dataclass
class _PromptRows:
    """Validates the rows of ``source`` into prompts, by the layout its first row shows: pairs when it
    has the chosen column (or the prompt is what chosen and rejected share), else prompts alone."""

    source: str
    cols: Columns
    pairs: bool = False

    def check_first(self, row: dict) -> None:
        self.pairs = self.cols.prompt is None or self.cols.chosen in row
        # Scores and margins are the offline pairs' business: the prompt needs only what it is made of.
        needed = Columns(self.cols.prompt, self.cols.chosen, self.cols.rejected).required() if self.pairs else [self.cols.prompt]
        check_columns(self.source, row, self.cols, needed)

    def __call__(self, row: dict) -> str | list[dict]:
        if self.pairs:
            return row_prompt(row, self.cols)
        return check_prompt(row.get(self.cols.prompt), self.cols.prompt)


def load_prompts(source: str, cols: Columns, *, split: str = "train", on_bad_row: str = "error") -> list[str | list[dict]]:
    """Each distinct prompt of ``source`` once, in the order first seen; how many rows repeated one
    is logged. Bad rows are a :class:`DataError` naming the file, row and field, or skipped with a
    logged count under ``on_bad_row='skip'``, as the pair reader does (:func:`~.pairs.validated_rows`)."""
    rows = _PromptRows(source, cols)
    distinct: dict[str, str | list[dict]] = {}
    read = 0
    for _, prompt in validated_rows(source, rows, rows.check_first, split=split, on_bad_row=on_bad_row):
        # A conversation is a list of dicts: its JSON (keys sorted) is what tells it from another.
        distinct.setdefault(json.dumps(prompt, sort_keys=True), prompt)
        read += 1
    if read > len(distinct):
        # Pairs share prompts by design (several answers to one prompt); a prompt file repeating one is news.
        log.log(logging.INFO if rows.pairs else logging.WARNING,
                "%s: %d of %d %s repeat an earlier prompt: reading %d distinct prompts, each once", source,
                read - len(distinct), read, "pairs" if rows.pairs else "rows", len(distinct))
    return list(distinct.values())


def prompt_splits(train_file: str, val_file: str | None, val_fraction: float | None, cols: Columns, *, split: str,
                  val_split: str, on_bad_row: str, seed: int) -> tuple[list, list | None]:
    """``(training prompts, validation prompts or None)``: from ``val_file``, or ``val_fraction`` of
    the training prompts held out with ``seed`` (:func:`~.sampling.held_out`, as pairs are)."""
    train = load_prompts(train_file, cols, split=split, on_bad_row=on_bad_row)
    if val_file is not None:
        return train, load_prompts(val_file, cols, split=val_split, on_bad_row=on_bad_row)
    if val_fraction is None:
        return train, None
    kept, val = held_out(len(train), val_fraction, seed)
    return [train[i] for i in kept], [train[i] for i in val]


def offline_pairs_per_batch(batch_size: int, share: float) -> int:
    """``n_off = round(b * s / (1 - s))``: the offline pairs a batch of ``b`` prompts carries so that
    they are a share ``s`` of the step's pairs, one online pair per prompt: ``n_off / (b + n_off) ≈ s``."""
    return round(batch_size * share / (1 - share))


def check_online_settings(*, prompts_only: bool, offline_file: str | None, offline_share: float, batch_size: int,
                          rejected_column: str | None, label_flip_rate: float, label_noise: str, noise_validation: bool,
                          group_by_length: bool) -> None:
    """Raise :class:`SettingError` on prompts_only / offline settings that do not go together, naming the option."""
    if not (isinstance(offline_share, (int, float)) and 0.0 <= offline_share < 1.0):
        raise SettingError(f"offline_share must be in [0, 1) (the share of a step's pairs that are offline), got {offline_share}")
    if not prompts_only:
        if offline_file is not None or offline_share > 0:
            raise SettingError("offline_file and offline_share mix offline pairs into online training: they need "
                               "--data.prompts_only true (without it every pair is offline)")
        return
    if offline_share > 0 and offline_file is None:
        raise SettingError(f"offline_share {offline_share:g} mixes offline pairs into training: name them with --data.offline_file")
    if offline_file is not None and offline_share == 0:
        raise SettingError(f"offline_file {offline_file} is read only with --data.offline_share above 0 (the share of a "
                           "step's pairs that are offline)")
    if offline_file is not None and rejected_column is None:
        raise SettingError("offline_file holds pairs, and rejected_column is None: name the rejected column with "
                           "--data.rejected_column")
    if offline_share > 0 and offline_pairs_per_batch(batch_size, offline_share) == 0:
        raise SettingError(f"offline_share {offline_share:g} gives round({batch_size} * {offline_share:g} / "
                           f"{1 - offline_share:g}) = 0 offline pairs per batch of {batch_size} prompts: raise "
                           "--data.offline_share or --data.batch_size")
    noise = {"label_flip_rate": label_flip_rate > 0, "label_noise": label_noise != "uniform",
             "noise_validation": noise_validation}
    if named := [name for name, set_ in noise.items() if set_]:
        raise SettingError(f"{', '.join(named)}: label noise flips the labels of a data file's pairs, and with "
                           "prompts_only the pairs are sampled and scored online: leave it at its defaults")
    if group_by_length:
        raise SettingError("group_by_length groups pairs by length, and with prompts_only a batch is prompts: "
                           "leave --data.group_by_length false")


def collate_prompts(prompts: list[str | list[dict]]) -> dict[str, list]:
    """A batch of prompts as they are (text or conversations), under ``prompts``."""
    return {"prompts": list(prompts)}


class PromptLoader(ResumableDataLoader):
    """Batches ``{"prompts": [...]}``, each with ``offline``'s next batch of pairs when there is one.

    The offline loader runs through its own epochs, reshuffled each time it runs out, independently
    of the prompts' epochs; its place is saved with the prompts' (:meth:`state_dict`), so a resumed
    run sees the same prompts and pairs as an uninterrupted one.
    """

    offline: ResumableDataLoader | None = None

    def __iter__(self):
        if self.offline is None:
            yield from super().__iter__()
            return
        # Go on where the last pass (or a resumed checkpoint) left the offline epoch, not from its start.
        self.offline.load_state_dict(self.offline.state_dict())
        pairs = self._offline_batches()
        for batch in super().__iter__():
            yield {**batch, **next(pairs)}

    def _offline_batches(self):
        while True:
            yield from self.offline
            self.offline.sampler.set_epoch(self.offline.sampler.epoch + 1)

    def state_dict(self) -> dict:
        state = super().state_dict()
        return state if self.offline is None else {**state, "offline": self.offline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.offline is not None:
            self.offline.load_state_dict(state["offline"])


def prompt_loader(prompts: list, batch_size: int, *, world: int = 1, rank: int = 0, num_workers: int = 0,
                  offline: datasets.Dataset | None = None, offline_batch_size: int = 0,
                  pad_token_id: int | None = None) -> PromptLoader:
    """The training loader of prompt batches (shuffled and split across ranks as pairs are,
    :func:`~.sampling.shuffled_loader`), with ``offline_batch_size`` pairs of ``offline`` (tokenized
    pairs) in each. An offline epoch leaves out its last pairs short of a batch, so every batch
    carries exactly that many (other pairs are left out in each epoch's reshuffle)."""
    if len(prompts) < batch_size * world:
        log.warning("batch_size %d%s is more than the %d training prompts: every step samples for all of them, one "
                    "step an epoch", batch_size, f" x {world} processes" if world > 1 else "", len(prompts))
    loader = shuffled_loader(prompts, batch_size, world=world, rank=rank, loader=PromptLoader,
                             collate_fn=collate_prompts, num_workers=num_workers)
    if offline is not None:
        loader.offline = shuffled_loader(offline, offline_batch_size, world=world, rank=rank, drop_last=True,
                                         collate_fn=PairCollator(pad_token_id), num_workers=num_workers)
        if len(loader.offline) == 0:
            raise DataError(f"the offline_file has {len(offline)} pairs{f' for {world} processes' if world > 1 else ''}, "
                            f"fewer than the {offline_batch_size} a batch carries (offline_share): lower "
                            "--data.offline_share or --data.batch_size")
    return loader


def val_prompt_loader(prompts: list, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Validation prompts in order, in batches ``{"prompts": [...]}``."""
    return DataLoader(prompts, batch_size=batch_size, collate_fn=collate_prompts, num_workers=num_workers)
