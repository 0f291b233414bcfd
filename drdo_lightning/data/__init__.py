"""Preference data, from files to batches, one concern a module.

:mod:`.readers` (rows from JSON/JSONL/CSV/Parquet, folders, the hub) -> :mod:`.pairs` (validated
prompt/response texts, chat rendering; :mod:`.noise` picks the pairs label noise flips) ->
:mod:`.tokenization` (token ids, truncation) -> :mod:`.building` (splits tokenized in bounded memory)
-> :mod:`.sampling` (resumable, length-grouped order) -> :mod:`.collation` (padded tensors); :mod:`.datamodule` ties them into the
:class:`PreferenceDataModule` that every recipe uses; :mod:`.prompts` reads prompts alone for its online mode. :mod:`.splits` builds the paper's
non-deterministic splits of a labelled dataset.

The names re-exported here are the ones recipes and user code import from ``drdo_lightning.data``.
"""

from drdo_lightning.data.collation import FLOAT_COLUMNS, PairCollator
from drdo_lightning.data.datamodule import PreferenceDataModule
from drdo_lightning.data.noise import bt_flip_indices, flip_rows, low_margin_flip_indices
from drdo_lightning.data.pairs import Columns, RowError, TextPair, iter_pairs, load_pairs
from drdo_lightning.data.readers import read_rows
from drdo_lightning.data.sampling import ResumableDataLoader, ResumableSampler, group_by_length, padding_fraction
from drdo_lightning.data.tokenization import IGNORE_INDEX, load_tokenizer, tokenize_pairs, truncate_prompt
from drdo_lightning.errors import DataError

__all__ = [
    "FLOAT_COLUMNS", "IGNORE_INDEX", "Columns", "DataError", "PairCollator", "PreferenceDataModule", "ResumableDataLoader",
    "ResumableSampler", "RowError", "TextPair", "bt_flip_indices", "flip_rows", "group_by_length", "iter_pairs",
    "load_pairs", "load_tokenizer", "low_margin_flip_indices", "padding_fraction", "read_rows", "tokenize_pairs",
    "truncate_prompt",
]
