"""The Lightning data module: preference (or SFT) pairs from files to cached, tokenized batches.

Rows are triples ``(prompt, chosen, rejected)`` with optional Oracle scores for each
response; ``rejected_column=None`` reads SFT data (prompt and chosen only).

Each field may be a plain string or, for conversational data, a list of
``{"role", "content"}`` messages (the Ultrafeedback "binarized" layout: ``chosen`` and
``rejected`` are whole conversations ending in an assistant turn; or the TRL layout:
``prompt`` is the conversation so far and ``chosen``/``rejected`` hold one assistant turn).
Conversations are rendered with the tokenizer's chat template. Data without a prompt column
(TRL's implicit-prompt layout, Anthropic HH transcripts) takes ``prompt_column=None``: the prompt is
what chosen and rejected begin with (:func:`~drdo_lightning.data.pairs.extract_prompt`).

What building the splits loses or changes (truncated, dropped, skipped, flipped) is logged once,
as a warning in words; that a cache was reused is logged as information.

Rows stream from the file to the tokenized cache through Arrow files on disk, so memory does not
grow with the data (:mod:`drdo_lightning.data.building`)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from drdo_lightning.data.building import SplitTokenizer, tokenize_split, worker_processes, write_texts
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.pairs import Columns, flip_indices, iter_pairs
from drdo_lightning.data.sampling import ResumableDataLoader, ResumableSampler, padding_fraction, sequence_lengths
from drdo_lightning.data.tokenization import chat_renderer, describe_counts, load_tokenizer, warn_trailing_whitespace
from drdo_lightning.errors import DataError, SettingError

log = logging.getLogger(__name__)

NOTICES_FILE = "notices.json"  # the warnings building a cache gave, repeated when it is loaded
CACHE_FORMAT_VERSION = 2  # 2: each split is the Arrow file tokenizing wrote (<split>.arrow), not a save_to_disk copy

def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else repr(tokenizer.get_vocab())]
    parts += [str(tokenizer.chat_template), str(tokenizer.all_special_tokens), str(tokenizer.eos_token_id)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _file_stamp(path: Path, name: Path) -> str:
    stat = path.stat()
    return f"{name}:{stat.st_size}:{stat.st_mtime_ns}"


def _source_fingerprint(source: str) -> str:
    """What the cache key knows of ``source``: the name, size and time of each of its files (for a
    glob, those it matches now), or a hub id as it is."""
    path = Path(source).expanduser()
    if path.is_file():
        return _file_stamp(path, path.resolve())
    if path.is_dir():
        return ";".join(_file_stamp(p, p.relative_to(path)) for p in sorted(path.rglob("*")) if p.is_file())
    if glob.has_magic(source):
        matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        return ";".join(_file_stamp(p, p.resolve()) for p in matched if p.is_file())
    return f"hub:{source}"


@contextlib.contextmanager
def warnings_recorded():
    """The messages of the data package's warnings while the block runs (they are logged as usual too)."""
    notices: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notices.append(record.getMessage())

    handler = Recorder(logging.WARNING)
    logger = logging.getLogger("drdo_lightning.data")
    logger.addHandler(handler)
    try:
        yield notices
    finally:
        logger.removeHandler(handler)


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (or SFT texts) for every objective in this package.

    Args:
        train_file: JSONL/JSON/CSV/parquet file, ``save_to_disk`` directory, or hub dataset id.
        val_file: Validation data in the same forms; or use ``val_fraction``.
        val_fraction: Fraction of ``train_file`` held out for validation (seeded), in (0, 1).
        tokenizer: Tokenizer path or hub id (linked to the model path by the CLI).
        prompt_column, chosen_column, rejected_column: Column names; ``rejected_column=None``
            reads SFT data (prompt and chosen response only); ``prompt_column=None``
            (``--data.prompt_column null``) reads data without a prompt column, whose prompt is
            what chosen and rejected begin with (see the module docstring).
        chosen_score_column, rejected_score_column: Oracle reward columns (a number, or a
            list of numbers for an ensemble).
        max_prompt_length, max_length: Token budgets (paper: 512 / 1024); see the module
            docstring for the truncation rule.
        drop_long: Drop pairs that do not fit ``max_length`` instead of truncating them.
        label_flip_rate: Fraction of *training* pairs whose labels are swapped (seeded), for
            robustness experiments. Validation data is never flipped.
        on_bad_row: ``error`` stops at the first bad row; ``skip`` drops bad rows and logs
            counts by reason.
        num_proc: The most processes that tokenize (default: the cores not busy with other
            work); each takes at least ``ROWS_PER_PROCESS`` rows, so small data tokenizes in
            this process.
        chat_template: A Jinja chat template (string or file) overriding the tokenizer's.
        cache_dir: Where tokenized data is cached (keyed by data, tokenizer and settings).
        group_by_length: Batch training pairs of similar length together (less padding; the
            order stays shuffled beyond stretches of 64 batches), grouped before the split across
            processes, so several processes train on one process's batches. The share of padding
            tokens is logged either way.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float | None = None,
        tokenizer: str | None = None,
        prompt_column: str | None = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str | None = "rejected",
        chosen_score_column: str | None = None,
        rejected_score_column: str | None = None,
        max_prompt_length: int = 512,
        max_length: int = 1024,
        drop_long: bool = False,
        label_flip_rate: float = 0.0,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_bad_row: Literal["error", "skip"] = "error",
        num_proc: int | None = None,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        split: str = "train",
        val_split: str = "validation",
        cache_dir: str | None = "~/.cache/drdo_lightning",
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise SettingError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if val_fraction is not None and val_file is not None:
            raise SettingError("give either val_file or val_fraction, not both (a recipe's val_file is set aside with "
                               "--data.val_file null)")
        if not 0 < max_prompt_length < max_length:
            raise SettingError(f"need 0 < max_prompt_length < max_length (the prompt's budget leaves room for the "
                               f"response), got max_prompt_length {max_prompt_length} and max_length {max_length}")
        if not 0.0 <= label_flip_rate <= 1.0:
            raise SettingError(f"label_flip_rate must be in [0, 1], got {label_flip_rate}")
        if tokenizer is None:
            raise SettingError("a tokenizer path or hub id is required (the CLI links it to the model path)")
        if (chosen_score_column is None) != (rejected_score_column is None):
            raise SettingError("give both chosen_score_column and rejected_score_column, or neither")
        if num_proc is not None and num_proc < 1:
            raise SettingError(f"num_proc must be at least 1, got {num_proc}")
        self.save_hyperparameters()
        self._built_here = False  # prepare_data built the cache in this process (and so said what it lost)
        self.columns = Columns(prompt_column, chosen_column, rejected_column, chosen_score_column, rejected_score_column)
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code, chat_template=chat_template)
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._resume_position: dict[str, int] | None = None  # from a checkpoint, for the next training loader
        # Where splits built without a cache live: their Arrow files are mapped, not loaded, so
        # they must last as long as the module does (the directory goes when it does).
        self._scratch: tempfile.TemporaryDirectory | None = None

    @property
    def has_scores(self) -> bool:
        return self.columns.chosen_score is not None

    def cache_path(self) -> Path | None:
        """Directory of this configuration's tokenized cache (None when caching is off)."""
        if self.hparams.cache_dir is None:
            return None
        loading_only = ("batch_size", "eval_batch_size", "num_workers", "num_proc", "cache_dir", "group_by_length")
        keys = {k: v for k, v in self.hparams.items() if k not in loading_only}
        material = json.dumps(
            {
                "version": CACHE_FORMAT_VERSION,
                "hparams": keys,
                "train": _source_fingerprint(self.hparams.train_file),
                "val": _source_fingerprint(self.hparams.val_file) if self.hparams.val_file else None,
                "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            },
            sort_keys=True,
            default=str,
        )
        return Path(self.hparams.cache_dir).expanduser() / hashlib.sha256(material.encode()).hexdigest()[:24]

    def _texts(self, source: str, split: str, template, path: Path) -> datasets.Dataset:
        """The validated rows of ``source`` in an Arrow file at ``path``."""
        pairs = iter_pairs(source, self.columns, template, split=split, on_bad_row=self.hparams.on_bad_row)
        texts, trailing = write_texts(pairs, path)
        warn_trailing_whitespace(trailing, len(texts))
        return texts

    def _tokenize(self, texts: datasets.Dataset, order: list[int], flipped: frozenset[int], name: str, work: Path):
        hp = self.hparams
        settings = dict(max_prompt_length=hp.max_prompt_length, max_length=hp.max_length, drop_long=hp.drop_long)
        processes = worker_processes(len(order), hp.num_proc)
        log.info("tokenizing %d %s pairs in %d process(es)", len(order), name, processes)
        job = SplitTokenizer(texts, order, flipped, self.tokenizer, settings)
        dataset, counts = tokenize_split(job, work / f"{name}.arrow", processes)
        if counts:
            words = describe_counts(counts, len(order), max_prompt_length=hp.max_prompt_length, max_length=hp.max_length)
            log.warning("%s split: %s; %d pairs kept; counts %s", name, words, len(dataset or ()), dict(counts))
        if dataset is None:
            raise DataError(f"{name} split is empty after filtering ({dict(counts)}); raise max_length or set drop_long=False")
        return dataset

    def _build(self, work: Path) -> dict[str, datasets.Dataset]:
        """Validate and tokenize every split through Arrow files in ``work`` (see "Building splits in
        bounded memory"); the splits returned are mapped from there."""
        hp = self.hparams
        template = chat_renderer(self.tokenizer)
        train = self._texts(hp.train_file, hp.split, template, work / "train.texts.arrow")
        # Each split is some rows of a text file, in order: (texts, row order).
        splits = {"train": (train, list(range(len(train))))}
        if hp.val_file is not None:
            val = self._texts(hp.val_file, hp.val_split, template, work / "val.texts.arrow")
            splits["val"] = (val, list(range(len(val))))
        elif hp.val_fraction is not None:
            order = list(range(len(train)))
            random.Random(hp.seed).shuffle(order)
            n_val = max(1, round(hp.val_fraction * len(train)))
            if n_val >= len(train):
                raise DataError(f"val_fraction={hp.val_fraction} leaves no training rows out of {len(train)}")
            splits = {"train": (train, order[n_val:]), "val": (train, order[:n_val])}
        flipped: frozenset[int] = frozenset()
        if hp.label_flip_rate > 0:
            if train[0]["rejected"] is None:
                raise SettingError("label_flip_rate needs preference pairs (rejected_column is None)")
            n_train = len(splits["train"][1])
            flipped = frozenset(flip_indices(n_train, hp.label_flip_rate, hp.seed))
            log.log(
                logging.WARNING if flipped else logging.INFO,
                "label noise: swapped chosen and rejected (and their scores) in %d of %d training pairs "
                "(label_flip_rate %g, seed %d)", len(flipped), n_train, hp.label_flip_rate, hp.seed,
            )
        return {
            name: self._tokenize(texts, order, flipped if name == "train" else frozenset(), name, work)
            for name, (texts, order) in splits.items()
        }

    def prepare_data(self) -> None:
        """Tokenize once and cache (runs on one process per node before ``setup``)."""
        cache = self.cache_path()
        if cache is None or (cache / "train.arrow").exists():
            return
        # Built where it will stay: the tokenized splits are the cache as written, never copied
        # (a copy would read every token back through memory). Their text files go before the
        # folder takes the cache's name.
        staging = cache.with_name(cache.name + f".tmp{os.getpid()}")
        staging.mkdir(parents=True)
        try:
            with warnings_recorded() as notices:
                self._build(staging)
            (staging / NOTICES_FILE).write_text(json.dumps(notices, indent=1))
            self._built_here = True
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for texts in staging.glob("*.texts.arrow"):
            texts.unlink()
        try:
            staging.rename(cache)
        except OSError:  # another process cached the same data first
            shutil.rmtree(staging, ignore_errors=True)
        log.info("cached tokenized data in %s", cache)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        cache = self.cache_path()
        if cache is not None and (cache / "train.arrow").exists():
            log.info("loading tokenized data from cache %s", cache)
            notices = cache / NOTICES_FILE
            if not self._built_here and notices.is_file():  # what building it lost is news at every load
                for notice in json.loads(notices.read_text()):
                    log.warning("%s (tokenized data from the cache)", notice)
            splits = {
                name: datasets.Dataset.from_file(str(cache / f"{name}.arrow"))
                for name in ("train", "val")
                if (cache / f"{name}.arrow").exists()
            }
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="drdo_lightning-")
            splits = self._build(Path(self._scratch.name))
        self.train_dataset, self.val_dataset = splits["train"], splits.get("val")

    def _loader(self, ds: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        kwargs = dict(
            batch_size=batch_size, collate_fn=PairCollator(self.tokenizer.pad_token_id), num_workers=self.hparams.num_workers
        )
        if not shuffle:
            return DataLoader(ds, **kwargs)
        # Shuffled per epoch from seed_everything's seed (as Lightning's own distributed sampler
        # is), split across ranks, and resumable mid-epoch.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(ds, num_replicas=world, rank=rank, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        lengths = sequence_lengths(ds)
        if self.hparams.group_by_length:
            sampler.lengths, sampler.batch_size = [max(pair) for pair in lengths], batch_size
        log.info(
            "training batches: %.1f%% of tokens are padding (group_by_length=%s)",
            100 * padding_fraction(lengths, sampler.order(), batch_size), self.hparams.group_by_length,
        )
        return ResumableDataLoader(ds, sampler=sampler, **kwargs)

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)
        if self._resume_position is not None:
            self._train_loader.load_state_dict(self._resume_position)
            self._resume_position = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's place in its epoch, saved in every checkpoint.

        Lightning saves it with its loop state as well, but hands it back only to a loader made
        after it restores the loops: a loader made earlier, as when ``max_epochs`` is set and the
        learning-rate schedule asks for ``estimated_stepping_batches``, would start its epoch over.
        The data module's state comes back with the model's, and :meth:`load_state_dict` gives it
        to the training loader whether that is made before or after.
        """
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = state.get("train_loader")
        if position is None:
            return
        if self._train_loader is None:
            self._resume_position = position
        else:  # strategies that restore after setting up (DeepSpeed, FSDP) have made the loader by then
            self._train_loader.load_state_dict(position)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.hparams.eval_batch_size or self.hparams.batch_size, shuffle=False)

    def add_columns(self, split: str, columns: dict[str, list[float]]) -> None:
        """Attach per-example columns to the ``train`` or ``val`` split (e.g. reference log-probs)."""
        name = f"{split}_dataset"
        dataset = getattr(self, name)
        for key, values in columns.items():
            if key in dataset.column_names:
                dataset = dataset.remove_columns(key)
            dataset = dataset.add_column(key, values)
        setattr(self, name, dataset)

    def ordered_dataloader(self, split: str) -> DataLoader:
        """The ``train`` or ``val`` split in dataset order (for precomputing per-example values)."""
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        return self._loader(getattr(self, f"{split}_dataset"), batch_size, shuffle=False)
