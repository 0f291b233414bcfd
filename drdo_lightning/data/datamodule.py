"""The Lightning data module: preference (or SFT) pairs from files to cached, tokenized batches.

Rows are triples ``(prompt, chosen, rejected)`` with optional Oracle scores for each
response; ``rejected_column=None`` reads SFT data (prompt and chosen only).

Each field may be a plain string or, for conversational data, a list of
``{"role", "content"}`` messages (the Ultrafeedback "binarized" layout: ``chosen`` and
``rejected`` are whole conversations ending in an assistant turn; or the TRL layout:
``prompt`` is the conversation so far and ``chosen``/``rejected`` hold one assistant turn, as
messages or as plain text).
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
import math
import os
import random
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from drdo_lightning.data.building import SplitTokenizer, tokenize_split, worker_processes, write_texts
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.columns import ExampleColumns, Split
from drdo_lightning.data.noise import LABEL_NOISE_MODELS, noise_flip_indices
from drdo_lightning.data.pairs import Columns, iter_pairs
from drdo_lightning.data.readers import folder_splits
from drdo_lightning.data.prompts import (check_online_settings, offline_pairs_per_batch, prompt_loader, prompt_splits,
                                         val_prompt_loader)
from drdo_lightning.data.sampling import ResumableDataLoader, held_out, padding_fraction, sequence_lengths, shuffled_loader
from drdo_lightning.data.tokenization import (
    DEFAULT_MAX_PROMPT_LENGTH,
    chat_renderer,
    describe_counts,
    load_tokenizer,
    warn_trailing_whitespace,
)
from drdo_lightning.errors import DataError, SettingError, shipped_made_by

log = logging.getLogger(__name__)

NOTICES_FILE = "notices.json"  # the warnings building a cache gave, repeated when it is loaded
NOISE_SETTINGS = ("label_noise", "noise_margin_column", "noise_score_columns", "noise_temperature")
CACHE_FORMAT_VERSION = 2  # 2: each split is the Arrow file tokenizing wrote (<split>.arrow), not a save_to_disk copy
# The share of a user's own training file held out for validation when the recipe's val_file is the
# embedded default's and the file has no validation split (validation_source).
OWN_DATA_VAL_FRACTION = 0.1
DEFAULT_VAL_SPLIT = "validation"

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


def _handled_elsewhere(record: logging.LogRecord, besides: logging.Handler) -> bool:
    """Whether a handler other than ``besides`` sits on ``record``'s way up the logger tree."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not besides for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


@contextlib.contextmanager
def warnings_recorded():
    """The messages of the data package's warnings while the block runs (they are logged as usual too).

    A program that configures no logging (the command line, most notebooks) shows warnings through
    ``logging.lastResort``, which Python uses only when a record meets no handler: the recorder
    would be that handler and keep them from the console, so it hands them on to it then."""
    notices: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notices.append(record.getMessage())
            last_resort = logging.lastResort
            if last_resort is not None and record.levelno >= last_resort.level and not _handled_elsewhere(record, self):
                last_resort.handle(record)

    handler = Recorder(logging.WARNING)
    logger = logging.getLogger("drdo_lightning.data")
    logger.addHandler(handler)
    try:
        yield notices
    finally:
        logger.removeHandler(handler)


def validation_source(train_file: str, val_file: str | None, val_fraction: float | None, split: str,
                      val_split: str, tokenizer: str | None) -> tuple[str | None, float | None, str]:
    """``(val_file, val_fraction, val_split)``: where validation comes from when the settings leave it open.

    - A ``train_file`` of the user's own (outside the shipped folder) next to a recipe's defaults in
      the embedded default's folder: a shipped model that is not here is a :class:`SettingError`
      naming ``--model.model``; a shipped ``val_file`` is set aside for the training folder's
      validation split if it has one, else for ``val_fraction`` of ``train_file``
      (:data:`OWN_DATA_VAL_FRACTION` unless given), with a notice.
    - A ``train_file`` folder with splits (a hub download, a ``DatasetDict``) and no ``val_file`` nor
      ``val_fraction``: its ``val_split``, or its ``test`` split when ``val_split`` is the default
      ``validation`` and it has none, validates, with a notice.
    - ``val_split`` set to a split no source has is an error, not ignored.
    """
    own = shipped_made_by(train_file) is None
    set_aside = None
    if own and tokenizer is not None and shipped_made_by(tokenizer) is not None and not Path(tokenizer).is_dir():
        raise SettingError(f"train_file {train_file} is your own data, but the model is the recipe's default "
                           f"({tokenizer}), which is not in this folder: name your starting policy with "
                           "--model.model (a model directory or hub id; its tokenizer comes with it)")
    if own and val_file is not None and shipped_made_by(val_file) is not None:
        set_aside, val_file = val_file, None
    from_folder = False
    if val_file is None and val_fraction is None and (splits := folder_splits(train_file)):
        held_out = val_split if val_split in splits else "test" if val_split == DEFAULT_VAL_SPLIT else None
        if held_out in splits and held_out != split:
            val_file, val_split, from_folder = train_file, held_out, True
    if val_file is None and val_split != DEFAULT_VAL_SPLIT:
        where = (f"the folder train_file {train_file} has splits {sorted(folder_splits(train_file))}"
                 if folder_splits(train_file) else f"train_file {train_file} has none, and no val_file was given")
        raise SettingError(f"val_split {val_split!r} names a split of val_file or of a train_file folder, but "
                           f"{where}: give --data.val_file (the same folder or hub id for its split)")
    if set_aside is not None and val_file is None:
        val_fraction = val_fraction or OWN_DATA_VAL_FRACTION
    if set_aside is not None:
        held = (f"{val_fraction:g} of train_file (val_fraction, seeded)" if val_file is None
                else f"train_file's {val_split!r} split")
        log.warning("val_file %s is the recipe's default, the embedded default's validation data, and train_file %s is "
                    "your own: validating on %s instead; name your own validation data with --data.val_file",
                    set_aside, train_file, held)
    elif from_folder:
        log.warning("train_file %s has a %r split and no val_file or val_fraction was given: validating on it "
                    "(--trainer.limit_val_batches 0 turns validation off)", train_file, val_split)
    return val_file, val_fraction, val_split


def _check_label_noise(noise: str, rate: float, margin_column: str | None, score_columns: list[str] | None,
                       temperature: float, rejected_column: str | None) -> str | tuple[str, str] | None:
    """Raise :class:`SettingError` on label-noise settings that do not go together; return the
    margin's columns as :class:`Columns` takes them (None for ``uniform``)."""
    if noise not in LABEL_NOISE_MODELS:
        raise SettingError(f"label_noise must be one of {', '.join(LABEL_NOISE_MODELS)}, got {noise!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise SettingError(f"noise_temperature must be a finite number >= 0, got {temperature}")
    if score_columns is not None and len(score_columns) != 2:
        raise SettingError(f"noise_score_columns takes two columns, [chosen, rejected] (the margin is their "
                           f"difference), got {list(score_columns)}")
    if noise == "uniform":
        if margin_column is not None or score_columns is not None:
            raise SettingError("noise_margin_column and noise_score_columns are read only by label_noise bt or "
                               "low_margin (label_noise is uniform)")
        return None
    if rejected_column is None:
        raise SettingError(f"label_noise {noise} needs preference pairs (rejected_column is None)")
    if (margin_column is None) == (score_columns is None):
        which = "neither was given" if margin_column is None else "both were given"
        raise SettingError(f"label_noise {noise} needs the pairs' margin: give noise_margin_column (a column of chosen "
                           f"minus rejected) or noise_score_columns ([chosen, rejected]), not both; {which}")
    if noise == "bt" and rate > 0:
        raise SettingError(f"label_noise bt resamples every training label (noise_temperature sets how noisily); "
                           f"label_flip_rate {rate:g} is for uniform and low_margin: leave it 0")
    return margin_column if margin_column is not None else tuple(score_columns)


class PreferenceDataModule(L.LightningDataModule, ExampleColumns):
    """Preference pairs (or SFT texts) for every objective in this package.

    Args:
        train_file: JSONL/JSON/CSV/parquet file, ``save_to_disk`` directory, or hub dataset id.
        val_file: Validation data in the same forms; or use ``val_fraction``. One in the embedded
            default's folder next to a ``train_file`` of your own is set aside (:func:`validation_source`).
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
        label_flip_rate: Fraction of *training* pairs whose labels are swapped, for robustness
            experiments: drawn at random (seeded) by ``label_noise uniform``, the pairs of smallest
            margin by ``low_margin``. Validation data is not flipped, but see ``noise_validation``.
        label_noise: Which training labels are flipped (docs/data.md, "Label noise"): ``uniform``
            (``label_flip_rate`` of them at random), ``bt`` (every label resampled from
            Bradley-Terry on the margin Δ: kept with probability σ(noise_temperature · Δ)) or
            ``low_margin`` (``label_flip_rate`` of them, those of smallest |Δ|).
        noise_margin_column: The column holding each pair's margin Δ (chosen minus rejected), for
            ``bt`` and ``low_margin``.
        noise_score_columns: Instead, two columns ``[chosen, rejected]`` of scores whose
            difference is Δ (e.g. ``[gold_chosen, gold_rejected]`` in the embedded default).
        noise_temperature: ``s`` in ``bt``'s σ(s · Δ), at least 0 (0: every label a coin flip).
        noise_validation: Apply the same label-noise model to the validation split carved from
            ``train_file`` by ``val_fraction`` (needs ``val_fraction``; a ``val_file`` is never
            flipped): ``uniform`` and ``low_margin`` flip ``label_flip_rate`` of the validation
            pairs (at random; the smallest |Δ| among them), ``bt`` resamples each. Model selection
            on such a split (best checkpoint, early stopping) sees labels as noisy as training's,
            and no clean label reaches the model.
        on_bad_row: ``error`` stops at the first bad row; ``skip`` drops bad rows and logs
            counts by reason.
        num_proc: The most processes that tokenize (default: the cores not busy with other
            work); each takes at least ``ROWS_PER_PROCESS`` rows, so small data tokenizes in
            this process.
        chat_template: A Jinja chat template (string or file) overriding the tokenizer's.
        split, val_split: The splits read from a folder, ``DatasetDict`` or hub id; a ``train_file``
            folder with a ``val_split`` (or only ``test``) validates on it when neither ``val_file``
            nor ``val_fraction`` is given (:func:`validation_source`).
        cache_dir: Where tokenized data is cached (keyed by data, tokenizer and settings).
        group_by_length: Batch training pairs of similar length together (less padding; the
            order stays shuffled beyond stretches of 64 batches), grouped before the split across
            processes, so several processes train on one process's batches. The share of padding
            tokens is logged either way.
        prompts_only: Train online (:mod:`.prompts`): ``train_file`` and the validation data give
            prompts (a file of prompts alone, or the prompts of pairs, each distinct one once) in
            batches ``{"prompts": [...]}`` of ``batch_size``, for the policy to answer.
        offline_file, offline_share: With ``prompts_only``, pairs (read, tokenized and cached as
            ``train_file``'s are otherwise) mixed into each training batch as a share
            ``offline_share`` in [0, 1) of the step's pairs, one online pair a prompt:
            ``round(batch_size * s / (1 - s))`` of them, collated as pair batches are.
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
        max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
        max_length: int = 1024,
        drop_long: bool = False,
        label_flip_rate: float = 0.0,
        label_noise: Literal["uniform", "bt", "low_margin"] = "uniform",
        noise_margin_column: str | None = None,
        noise_score_columns: list[str] | None = None,
        noise_temperature: float = 1.0,
        noise_validation: bool = False,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_bad_row: Literal["error", "skip"] = "error",
        num_proc: int | None = None,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        split: str = "train",
        val_split: str = DEFAULT_VAL_SPLIT,
        cache_dir: str | None = "~/.cache/drdo_lightning",
        group_by_length: bool = False,
        prompts_only: bool = False,
        offline_file: str | None = None,
        offline_share: float = 0.0,
    ) -> None:
        super().__init__()
        val_file, val_fraction, val_split = validation_source(train_file, val_file, val_fraction, split, val_split,
                                                              tokenizer)
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
        margin = _check_label_noise(label_noise, label_flip_rate, noise_margin_column, noise_score_columns,
                                    noise_temperature, rejected_column)
        if noise_validation and val_fraction is None:
            raise SettingError("noise_validation applies the training labels' noise to the validation split that "
                               "val_fraction carves from train_file: give val_fraction (a val_file is never flipped; "
                               "set it aside with --data.val_file null)")
        if tokenizer is None:
            raise SettingError("a tokenizer path or hub id is required (the CLI links it to the model path)")
        if (chosen_score_column is None) != (rejected_score_column is None):
            raise SettingError("give both chosen_score_column and rejected_score_column, or neither")
        if num_proc is not None and num_proc < 1:
            raise SettingError(f"num_proc must be at least 1, got {num_proc}")
        check_online_settings(prompts_only=prompts_only, offline_file=offline_file, offline_share=offline_share,
                              batch_size=batch_size, rejected_column=rejected_column, label_flip_rate=label_flip_rate,
                              label_noise=label_noise, noise_validation=noise_validation, group_by_length=group_by_length)
        self.save_hyperparameters()
        # What validation_source decided, over the values LightningCLI hands save_hyperparameters as given.
        self.hparams.update(val_file=val_file, val_fraction=val_fraction, val_split=val_split)
        self._built_here = False  # prepare_data built the cache in this process (and so said what it lost)
        self.columns = Columns(prompt_column, chosen_column, rejected_column, chosen_score_column, rejected_score_column,
                               margin)
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code, chat_template=chat_template)
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.train_prompts: list | None = None  # prompts_only: each split's prompts (the datasets hold offline pairs)
        self.val_prompts: list | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._resume_position: dict[str, int] | None = None  # from a checkpoint, for the next training loader
        # Where splits built without a cache live: their Arrow files are mapped, not loaded, so
        # they must last as long as the module does (the directory goes when it does).
        self._scratch: tempfile.TemporaryDirectory | None = None

    def cache_path(self) -> Path | None:
        """Directory of this configuration's tokenized cache (None when caching is off, or in prompts_only
        mode without offline pairs: nothing is tokenized)."""
        if self.hparams.cache_dir is None or self._pair_file() is None:
            return None
        loading_only = ("batch_size", "eval_batch_size", "num_workers", "num_proc", "cache_dir", "group_by_length",
                        "offline_share")
        keys = {k: v for k, v in self.hparams.items() if k not in loading_only}
        if keys["label_noise"] == "uniform":  # the margin-based models' settings change nothing: keys as before them
            for k in NOISE_SETTINGS:
                del keys[k]
        if not keys["noise_validation"]:  # off: keys as before the option
            del keys["noise_validation"]
        if not keys["prompts_only"]:  # off: keys as before the online mode
            del keys["prompts_only"], keys["offline_file"]
        material = json.dumps(
            {
                "version": CACHE_FORMAT_VERSION,
                "hparams": keys,
                "train": _source_fingerprint(self._pair_file()),
                "val": _source_fingerprint(self.hparams.val_file) if self.hparams.val_file else None,
                "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            },
            sort_keys=True,
            default=str,
        )
        return Path(self.hparams.cache_dir).expanduser() / hashlib.sha256(material.encode()).hexdigest()[:24]

    def _pair_file(self) -> str | None:
        """Where the pairs it tokenizes come from: ``train_file``, or in prompts_only mode ``offline_file`` (or none)."""
        return self.hparams.offline_file if self.hparams.prompts_only else self.hparams.train_file

    def _texts(self, source: str, split: str, template, path: Path, columns: Columns | None = None) -> datasets.Dataset:
        """The validated rows of ``source`` (by ``columns``, default the module's) in an Arrow file at ``path``."""
        pairs = iter_pairs(source, columns or self.columns, template, split=split, on_bad_row=self.hparams.on_bad_row)
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
        train = self._texts(self._pair_file(), hp.split, template, work / "train.texts.arrow")
        if hp.prompts_only:  # the offline pairs, mixed into training batches; validation is of prompts (setup)
            return {"train": self._tokenize(train, list(range(len(train))), frozenset(), "train", work)}
        # Each split is some rows of a text file, in order: (texts, row order).
        splits = {"train": (train, list(range(len(train))))}
        if hp.val_file is not None:
            no_margin = replace(self.columns, margin=None)  # validation labels are never flipped: no margin needed
            val = self._texts(hp.val_file, hp.val_split, template, work / "val.texts.arrow", no_margin)
            splits["val"] = (val, list(range(len(val))))
        elif hp.val_fraction is not None:
            kept, held = held_out(len(train), hp.val_fraction, hp.seed)
            splits = {"train": (train, kept), "val": (train, held)}
        flipped = {"train": self._flipped(train, splits["train"][1])}
        if hp.noise_validation and "val" in splits:  # carved from train_file: its rows have the margin too
            flipped["val"] = self._flipped(train, splits["val"][1], "validation")
        return {
            name: self._tokenize(texts, order, flipped.get(name, frozenset()), name, work)
            for name, (texts, order) in splits.items()
        }

    def _flipped(self, texts: datasets.Dataset, order: list[int], split: str = "training") -> frozenset[int]:
        """The positions of a split (rows ``order`` of ``texts``) whose labels the label-noise
        settings flip, logged once (a warning when there are any). The ``training`` split draws
        with ``seed``; the ``validation`` split (``noise_validation``) with a stream of its own."""
        hp = self.hparams
        noise = hp.label_noise
        if noise != "bt" and hp.label_flip_rate == 0:  # bt flips whatever the rate (which it requires to be 0)
            return frozenset()
        if texts[0]["rejected"] is None:
            raise SettingError("label_flip_rate needs preference pairs (rejected_column is None)")
        n_train = len(order)
        # The training split's draws are today's (seed); the validation split's are independent of them.
        seed = hp.seed if split == "training" else random.Random(f"{split}:{hp.seed}")
        if noise == "uniform":
            flipped = frozenset(noise_flip_indices("uniform", n_train, rate=hp.label_flip_rate, seed=seed))
            settings = f"label_flip_rate {hp.label_flip_rate:g}, seed {hp.seed}"
        else:
            column = texts.data.column("margin").to_pylist()
            margins = [column[i] for i in order]
            flipped = frozenset(noise_flip_indices(noise, n_train, rate=hp.label_flip_rate, margins=margins,
                                                   temperature=hp.noise_temperature, seed=seed))
            margin = hp.noise_margin_column or " - ".join(hp.noise_score_columns)
            if noise == "bt":
                settings = f"label_noise bt on margin {margin}, noise_temperature {hp.noise_temperature:g}, seed {hp.seed}"
            else:
                settings = (f"label_noise low_margin on margin {margin}, label_flip_rate {hp.label_flip_rate:g}: "
                            "the pairs of smallest |margin|")
        log.log(
            logging.WARNING if flipped else logging.INFO,
            "label noise: swapped chosen and rejected (and their scores) in %d of %d %s pairs (%s)",
            len(flipped), n_train, split, settings,
        )
        return flipped

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
        hp = self.hparams
        if hp.prompts_only and self.train_prompts is None:
            self.train_prompts, self.val_prompts = prompt_splits(
                hp.train_file, hp.val_file, hp.val_fraction, self.columns, split=hp.split, val_split=hp.val_split,
                on_bad_row=hp.on_bad_row, seed=hp.seed)
        if self.train_dataset is not None or self._pair_file() is None:
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
        kwargs = dict(collate_fn=PairCollator(self.tokenizer.pad_token_id), num_workers=self.hparams.num_workers)
        if not shuffle:
            return DataLoader(ds, batch_size=batch_size, **kwargs)
        world, rank = self._ranks()
        loader = shuffled_loader(ds, batch_size, world=world, rank=rank, **kwargs)
        sampler = loader.sampler
        lengths = sequence_lengths(ds)
        if self.hparams.group_by_length:
            sampler.lengths, sampler.batch_size = [max(pair) for pair in lengths], batch_size
        log.info(
            "training batches: %.1f%% of tokens are padding (group_by_length=%s)",
            100 * padding_fraction(lengths, sampler.order(), batch_size), self.hparams.group_by_length,
        )
        return loader

    def _ranks(self) -> tuple[int, int]:
        """``(world size, this process's rank)`` of the run (one process outside a trainer)."""
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        world, rank = self._ranks()
        if hp.prompts_only:
            self._train_loader = prompt_loader(
                self.train_prompts, hp.batch_size, world=world, rank=rank, num_workers=hp.num_workers,
                offline=self.train_dataset, offline_batch_size=offline_pairs_per_batch(hp.batch_size, hp.offline_share),
                pad_token_id=self.tokenizer.pad_token_id)
        else:
            if len(self.train_dataset) < hp.batch_size * world:
                log.warning("batch_size %d%s is more than the %d training pairs: every step trains on all of them, one "
                            "step an epoch (a smaller --data.batch_size takes several steps an epoch)", hp.batch_size,
                            f" x {world} processes" if world > 1 else "", len(self.train_dataset))
            self._train_loader = self._loader(self.train_dataset, hp.batch_size, shuffle=True)
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
        hp = self.hparams
        if hp.prompts_only:
            prompts = self.val_prompts
            return [] if prompts is None else val_prompt_loader(prompts, hp.eval_batch_size or hp.batch_size, hp.num_workers)
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.hparams.eval_batch_size or self.hparams.batch_size, shuffle=False)

    def has_split(self, split: Split) -> bool:
        return getattr(self, f"{split}_dataset") is not None

    def column(self, split: Split, name: str) -> list:
        dataset = getattr(self, f"{split}_dataset")
        if dataset is None:  # no such data, or prompts_only without an offline_file (pairs sampled as it trains)
            raise DataError(f"the {split} split holds no pairs (none was given, or prompts_only without an "
                            f"offline_file): no column {name!r}")
        if name not in dataset.column_names:
            raise DataError(f"the {split} split has no column {name!r} (columns: {', '.join(dataset.column_names)})")
        return list(dataset[name])

    def add_columns(self, split: Split, columns: dict[str, list[float]]) -> None:
        """Attach per-example columns to the ``train`` or ``val`` split (e.g. reference log-probs)."""
        name = f"{split}_dataset"
        dataset = getattr(self, name)
        for key, values in columns.items():
            if key in dataset.column_names:
                dataset = dataset.remove_columns(key)
            dataset = dataset.add_column(key, values)
        setattr(self, name, dataset)

    def ordered_dataloader(self, split: Split) -> DataLoader:
        """The ``train`` or ``val`` split in dataset order (for precomputing per-example values)."""
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        return self._loader(getattr(self, f"{split}_dataset"), batch_size, shuffle=False)
