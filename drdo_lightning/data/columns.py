"""The interface through which a training step adds per-example columns to a data module: values
computed once from the data's own batches (a frozen reference's log-probs) and cached beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from torch.utils.data import DataLoader

Split = Literal["train", "val"]


class ExampleColumns(Protocol):
    """A data module that takes per-example columns (:class:`~drdo_lightning.data.PreferenceDataModule` is one)."""

    def cache_path(self) -> Path | None:
        """Directory of the data's cache, where computed columns are cached too (None: no cache)."""

    def has_split(self, split: Split) -> bool:
        """Whether ``split`` is loaded."""

    def ordered_dataloader(self, split: Split) -> DataLoader:
        """``split``'s batches in dataset order, one column value per example in that order."""

    def column(self, split: Split, name: str) -> list:
        """The values of column ``name`` of ``split``, one per example in dataset order."""

    def add_columns(self, split: Split, columns: dict[str, list[float]]) -> None:
        """Attach per-example columns to ``split``; the batches then carry them."""
