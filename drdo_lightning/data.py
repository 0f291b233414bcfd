"""Preference data: read, validate, tokenize, truncate, cache, and collate.

Rows are triples ``(prompt, chosen, rejected)`` with optional Oracle scores for each
response; ``rejected_column=None`` reads SFT data (prompt and chosen only).

Each field may be a plain string or, for conversational data, a list of
``{"role", "content"}`` messages (the Ultrafeedback "binarized" layout: ``chosen`` and
``rejected`` are whole conversations ending in an assistant turn; or the TRL layout:
``prompt`` is the conversation so far and ``chosen``/``rejected`` hold one assistant turn).
Conversations are rendered with the tokenizer's chat template.

Truncation rule (per pair, applied identically to chosen and rejected):
  1. A prompt longer than ``max_prompt_length`` tokens keeps its *last* tokens (the part
     nearest the response), after any special tokens the tokenizer puts first (BOS).
  2. A response that does not fit in ``max_length - len(prompt)`` keeps its *first* tokens.
     With ``drop_long=True`` such pairs are dropped instead (the paper filters them).
Every truncation, drop and skipped row is counted and logged.

Rows stream from the file to the tokenized cache through Arrow files on disk, so memory does not
grow with the data (see "Building splits in bounded memory" below).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import datasets
import lightning as L
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets.arrow_writer import ArrowWriter
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from drdo_lightning.errors import EMBEDDED_MADE_BY, DataError, MissingPathError, is_embedded, require_pretrained
from drdo_lightning.jsonl import read_jsonl

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Per-example numbers the collator passes through as float tensors: Oracle scores ([B] or
# [B, K] for an ensemble) and precomputed reference log-probs.
FLOAT_COLUMNS = ("chosen_score", "rejected_score", "ref_chosen_logps", "ref_rejected_logps")
CACHE_FORMAT_VERSION = 2  # 2: each split is the Arrow file tokenizing wrote (<split>.arrow), not a save_to_disk copy


# ---------------------------------------------------------------------------------------
# Reading raw rows


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, row  # the line the record ends on (quoted fields may span lines)


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())  # a batch at a time
    yield from enumerate(rows, start=1)


def _read_dataset(ds: datasets.Dataset) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(ds, start=1):
        yield i, row


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, row)`` from a local file/directory or a hub dataset id.

    Local files: ``.jsonl``, ``.json`` (a list of objects), ``.csv``, ``.parquet``; a
    directory written by ``datasets.save_to_disk``. Anything else that does not exist
    locally is treated as a hub dataset id and loaded with ``datasets.load_dataset``.
    ``row_number`` is the line number for JSONL/CSV and the 1-based record index otherwise.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        return _read_dataset(loaded)
    readers = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix in readers:
        if not path.is_file():
            raise MissingPathError(f"data file not found: {path}" + (f": {EMBEDDED_MADE_BY}" if is_embedded(path) else ""))
        return readers[path.suffix](path)
    if path.suffix or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise MissingPathError(
            f"data source not found: {source} (expected an existing .jsonl/.json/.csv/.parquet file, "
            "a save_to_disk directory, or a hub dataset id 'owner/name')"
        )
    return _read_dataset(datasets.load_dataset(source, split=split))


# ---------------------------------------------------------------------------------------
# Validating rows into prompt/response texts


@dataclass
class Columns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str | None = "rejected"
    chosen_score: str | None = None
    rejected_score: str | None = None

    def required(self) -> list[str]:
        names = [self.prompt, self.chosen, self.rejected, self.chosen_score, self.rejected_score]
        return [n for n in names if n is not None]


@dataclass
class TextPair:
    """One validated row: the rendered prompt and responses, and the Oracle scores."""

    prompt: str
    chosen: str
    rejected: str | None
    chosen_score: float | list[float] | None
    rejected_score: float | list[float] | None
    prompt_has_special_tokens: bool  # rendered by a chat template, which writes its own BOS/EOS


class RowError(Exception):
    """A problem with one row: ``reason`` is a short key for skip counts."""

    def __init__(self, field: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.field, self.reason = field, reason


def check_messages(value: Any, field: str) -> list[dict]:
    """A conversation: a non-empty list of ``{'role': str, 'content': str}``; raises :class:`RowError`."""
    if not value or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise RowError(field, "bad_messages", "expected a non-empty list of {'role': str, 'content': str} messages")
    return value


def _check_text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(field, "null_field", "expected a non-empty string, got null")
    if not isinstance(value, str):
        raise RowError(field, "not_a_string", f"expected a non-empty string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "empty_field", "expected a non-empty string, got an empty one")
    return value


def _check_score(value: Any, field: str) -> float | list[float]:
    """A finite float, or a non-empty list of them (one per ensemble member)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RowError(field, "bad_score", f"expected a finite number, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(f):
            raise RowError(field, "bad_score", f"expected a finite number, got {v!r}")
        out.append(f)
    if not out:
        raise RowError(field, "bad_score", "expected a number or a non-empty list of numbers, got []")
    return out if isinstance(value, (list, tuple)) else out[0]


def _render_conversation(prompt: Any, chosen: Any, rejected: Any, template: Any, cols: Columns):
    """Split conversations into (prompt text, chosen text, rejected text) via the chat template."""
    chosen_msgs = check_messages(chosen, cols.chosen)
    rejected_msgs = check_messages(rejected, cols.rejected) if cols.rejected is not None else None
    for msgs, field in ((chosen_msgs, cols.chosen), (rejected_msgs, cols.rejected)):
        if msgs is not None and msgs[-1]["role"] != "assistant":
            raise RowError(field, "bad_roles", f"the last message must have role 'assistant', got {msgs[-1]['role']!r}")
    context = chosen_msgs[:-1]
    if rejected_msgs is not None and rejected_msgs[:-1] != context:
        raise RowError(cols.rejected, "bad_roles", "chosen and rejected conversations differ before the final assistant turn")
    if not context:  # TRL layout: the prompt column holds the conversation so far
        if isinstance(prompt, str):
            context = [{"role": "user", "content": _check_text(prompt, cols.prompt)}]
        else:
            context = check_messages(prompt, cols.prompt)
    if context[-1]["role"] == "assistant":
        raise RowError(cols.prompt, "bad_roles", "the prompt conversation must not end with an assistant turn")
    if template is None:
        raise RowError(
            cols.chosen, "no_chat_template",
            "conversational rows need a tokenizer with a chat template",
        )
    prompt_text = template(context, add_generation_prompt=True)

    def response(msgs):
        full = template(context + [msgs[-1]], add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise RowError(cols.chosen, "bad_roles", "the chat template does not render the prompt as a prefix")
        return full[len(prompt_text):]

    return prompt_text, response(chosen_msgs), response(rejected_msgs) if rejected_msgs is not None else None


def render_as_chat(pair: TextPair, template, cols: Columns) -> TextPair:
    """A plain-text pair as a one-turn chat (the prompt from the user, each response from the
    assistant) rendered with ``template``: how chat reward models read text. Rendered pairs pass."""
    if pair.prompt_has_special_tokens:
        return pair

    def turn(text: str | None) -> list[dict] | None:
        return None if text is None else [{"role": "assistant", "content": text}]

    prompt, chosen, rejected = _render_conversation(pair.prompt, turn(pair.chosen), turn(pair.rejected), template, cols)
    return replace(pair, prompt=prompt, chosen=chosen, rejected=rejected, prompt_has_special_tokens=True)


def validate_row(row: dict, cols: Columns, template) -> TextPair:
    """Check one raw row and render it to text; raises :class:`RowError`."""
    prompt, chosen = row.get(cols.prompt), row.get(cols.chosen)
    rejected = row.get(cols.rejected) if cols.rejected else None
    if isinstance(chosen, list):
        prompt_text, chosen_text, rejected_text = _render_conversation(prompt, chosen, rejected, template, cols)
        conversational = True
    else:
        prompt_text = _check_text(prompt, cols.prompt)
        chosen_text = _check_text(chosen, cols.chosen)
        rejected_text = _check_text(rejected, cols.rejected) if cols.rejected else None
        conversational = False
    if rejected_text is not None and chosen_text == rejected_text:
        raise RowError(cols.rejected, "identical_responses", "chosen and rejected responses are identical")
    scores = [
        _check_score(row.get(name), name) if name else None for name in (cols.chosen_score, cols.rejected_score)
    ]
    return TextPair(prompt_text, chosen_text, rejected_text, scores[0], scores[1], conversational)


def iter_pairs(source: str, cols: Columns, template, *, split: str = "train", on_bad_row: str = "error") -> Iterator[TextPair]:
    """Read and validate rows one at a time; bad rows raise or, with ``on_bad_row='skip'``, are counted
    (and logged once the source is exhausted)."""
    usable = 0
    skipped: Counter[str] = Counter()
    for row_number, row in read_rows(source, split):
        if not usable and not skipped:
            missing = [c for c in cols.required() if c not in row]
            if missing:
                raise DataError(f"{source}: missing column(s) {missing}; the data has columns {sorted(row)}")
        try:
            pair = validate_row(row, cols, template)
        except RowError as e:
            if on_bad_row == "error":
                message = f"{source}: row {row_number}: field {e.field!r}: {e}"
                if e.reason == "no_chat_template":
                    raise DataError(message, setting="chat_template", advice="give one with {option}") from None
                raise DataError(message, setting="on_bad_row", advice="{option} skip skips such rows") from None
            skipped[e.reason] += 1
            continue
        usable += 1
        yield pair
    if skipped:
        log.warning("%s: skipped %d bad rows: %s", source, sum(skipped.values()), dict(skipped))
    if not usable:
        raise DataError(f"{source}: no usable rows" + (f" (skipped: {dict(skipped)})" if skipped else ""))


def load_pairs(source: str, cols: Columns, template, *, split: str = "train", on_bad_row: str = "error") -> list[TextPair]:
    """Every row of :func:`iter_pairs` in a list (for data small enough to hold in memory)."""
    return list(iter_pairs(source, cols, template, split=split, on_bad_row=on_bad_row))


def swap_pair(pair: TextPair) -> None:
    """Swap chosen and rejected, and their scores, in place."""
    pair.chosen, pair.rejected = pair.rejected, pair.chosen
    pair.chosen_score, pair.rejected_score = pair.rejected_score, pair.chosen_score


def flip_indices(n: int, rate: float, seed: int | random.Random) -> list[int]:
    """The label-noise rule: exactly ``round(rate * n)`` of the indices ``0..n-1``, drawn without
    replacement by ``random.Random(seed)`` (or by ``seed`` itself, a ``Random``)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label_flip_rate must be in [0, 1], got {rate}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return rng.sample(range(n), round(rate * n))


def flip_labels(pairs: list, rate: float, seed: int | random.Random, swap: Callable[[Any], None] = swap_pair) -> int:
    """``swap`` the pairs that :func:`flip_indices` draws; return how many."""
    flipped = flip_indices(len(pairs), rate, seed)
    for i in flipped:
        swap(pairs[i])
    return len(flipped)


# ---------------------------------------------------------------------------------------
# Tokenization and truncation


def ends_in_whitespace(pair: TextPair) -> bool:
    """A plain-text prompt that ends in whitespace (see :func:`warn_trailing_whitespace`)."""
    return not pair.prompt_has_special_tokens and pair.prompt[-1:].isspace()


def warn_trailing_whitespace(n_ending: int, n: int) -> None:
    """Warn that ``n_ending`` of ``n`` prompts end in whitespace (:func:`ends_in_whitespace`), if any do."""
    if n_ending:
        log.warning(
            "%d of %d prompts end in whitespace. Prompt and response are tokenized apart, so that space "
            "becomes a token of its own instead of joining the response's first word as it does in "
            "generation; strip it from the prompts (or begin the responses with it)", n_ending, n,
        )


def truncate_prompt(ids: list[int], max_prompt_length: int, prefix: int) -> list[int]:
    """Rule 1 of the truncation rule: keep the first ``prefix`` ids (the tokenizer's BOS) and the
    last ``max_prompt_length - prefix`` of the rest."""
    if len(ids) <= max_prompt_length:
        return ids
    return ids[:prefix] + ids[len(ids) - (max_prompt_length - prefix):]


def tokenize_pairs(
    pairs: list[TextPair],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    max_length: int,
    drop_long: bool,
) -> tuple[dict[str, list], Counter[str]]:
    """Tokenize prompts and responses in batches and apply the module's truncation rule.

    Returns columns ``prompt_ids``, ``chosen_ids`` (and ``rejected_ids``, scores when
    present) and counts of what was truncated or dropped.
    """
    counts: Counter[str] = Counter()
    has_rejected = pairs[0].rejected is not None
    n_prefix = len(tokenizer("", add_special_tokens=True)["input_ids"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        return tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]

    # A chat-templated prompt already carries its special tokens and its responses their
    # end-of-turn markers; plain text gets the tokenizer's BOS (if any) and an EOS.
    templated = [p.prompt_has_special_tokens for p in pairs]
    prompt_ids: list[list[int]] = [[] for _ in pairs]
    for flag in (False, True):
        idx = [i for i, t in enumerate(templated) if t == flag]
        for i, seq in zip(idx, encode([pairs[i].prompt for i in idx], special=not flag)):
            prompt_ids[i] = seq
    responses = {
        key: [seq if templated[i] else seq + eos for i, seq in enumerate(encode([getattr(p, key) for p in pairs], False))]
        for key in (("chosen", "rejected") if has_rejected else ("chosen",))
    }

    out: dict[str, list] = {"prompt_ids": [], **{f"{k}_ids": [] for k in responses}}
    score_keys = [k for k in ("chosen_score", "rejected_score") if getattr(pairs[0], k) is not None]
    for k in score_keys:
        out[k] = []
    for i, pair in enumerate(pairs):
        prompt = truncate_prompt(prompt_ids[i], max_prompt_length, n_prefix if not pair.prompt_has_special_tokens else 0)
        if len(prompt) < len(prompt_ids[i]):
            counts["prompt_truncated"] += 1
        budget = max_length - len(prompt)
        resp = {k: r[i] for k, r in responses.items()}
        if any(len(r) > budget for r in resp.values()):
            if drop_long:
                counts["dropped_too_long"] += 1
                continue
            resp = {k: r[:budget] for k, r in resp.items()}
            counts["response_truncated"] += 1
        out["prompt_ids"].append(prompt)
        for k, r in resp.items():
            out[f"{k}_ids"].append(r)
        for k in score_keys:
            out[k].append(getattr(pair, k))
    return out, counts


# ---------------------------------------------------------------------------------------
# Collation


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


def sequence_lengths(ds: datasets.Dataset) -> list[tuple[int, ...]]:
    """Per example, the token length of ``prompt + chosen`` (and of ``prompt + rejected``)."""
    table = ds.with_format("arrow")[:]
    prompt = pc.list_value_length(table["prompt_ids"])
    responses = [k for k in ("chosen_ids", "rejected_ids") if k in table.column_names]
    sides = [pc.add(prompt, pc.list_value_length(table[k])).to_pylist() for k in responses]
    return list(zip(*sides))


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
    pair), the order is grouped by length for batches of ``batch_size`` (:func:`group_by_length`,
    seeded per epoch like the shuffle, so a resumed run sees the same batches).
    """

    start = 0
    lengths: list[int] | None = None
    batch_size = 1

    def order(self) -> list[int]:
        """This rank's items for the current epoch, in order."""
        # The shuffle draws from a CPU generator. Lightning's DeepSpeed set-up asks for the loader
        # while the GPU is the default device, where randperm would refuse a CPU generator.
        with torch.device("cpu"):
            indices = list(super().__iter__())
        if self.lengths is None:
            return indices
        return group_by_length(indices, self.lengths, self.batch_size, seed=self.seed + self.epoch)

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


# ---------------------------------------------------------------------------------------
# Building splits in bounded memory
#
# Rows stream from the reader through validation into an Arrow file on disk, and batches of
# them stream through tokenization into another: neither the texts nor the token ids of a
# split are ever held in Python lists all at once (their objects cost some 40 bytes a token),
# so memory stays flat however many rows there are, and batches tokenize in parallel.

BATCH_ROWS = 256  # rows tokenized together: the Python lists of one batch (~40 bytes a token) are what tokenizing holds
ROWS_PER_PROCESS = 5000  # below this many rows a worker costs more to start than it saves


def free_cores() -> int:
    """Cores this process may run on, less those that other work kept busy over the last minute."""
    # sched_getaffinity (the cores this process is allowed) is Linux-only
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable - round(os.getloadavg()[0]))


def write_texts(pairs: Iterator[TextPair], path: Path) -> tuple[datasets.Dataset, int]:
    """Write ``pairs`` to an Arrow file at ``path`` as they come and map it back (memory-mapped, so
    the rows stay on disk); also return how many prompts :func:`ends_in_whitespace`."""
    trailing = 0
    with ArrowWriter(path=str(path), writer_batch_size=BATCH_ROWS) as writer:
        for pair in pairs:
            trailing += ends_in_whitespace(pair)
            writer.write(asdict(pair))
        writer.finalize()
    return datasets.Dataset.from_file(str(path)), trailing


@dataclass
class SplitTokenizer:
    """Tokenizes one batch of a split: the split is rows ``order`` of ``texts`` (written by
    :func:`write_texts`), and the pairs at the positions in ``flipped`` have their labels swapped."""

    texts: datasets.Dataset
    order: list[int]
    flipped: frozenset[int]
    tokenizer: PreTrainedTokenizerBase
    settings: dict[str, Any]  # tokenize_pairs' keyword arguments

    def __call__(self, start: int) -> tuple[dict[str, list], Counter[str]]:
        """The batch of ``BATCH_ROWS`` positions from ``start``: :func:`tokenize_pairs`'s columns and counts."""
        positions = range(start, min(start + BATCH_ROWS, len(self.order)))
        rows = self.texts[[self.order[p] for p in positions]]
        pairs = [TextPair(**dict(zip(rows, values))) for values in zip(*rows.values())]
        for position, pair in zip(positions, pairs):
            if position in self.flipped:
                swap_pair(pair)
        return tokenize_pairs(pairs, self.tokenizer, **self.settings)


_worker_job: SplitTokenizer | None = None  # a worker process's job, set once when the pool starts


def _start_worker(job: SplitTokenizer) -> None:
    global _worker_job
    _worker_job = job


def _run_worker(start: int) -> tuple[dict[str, list], Counter[str]]:
    return _worker_job(start)


def tokenize_split(job: SplitTokenizer, path: Path, processes: int) -> tuple[datasets.Dataset | None, Counter[str]]:
    """Run ``job`` on every batch, in order, writing the columns to an Arrow file at ``path`` and
    mapping it back (None when every pair was dropped); return it and the summed counts. With
    ``processes > 1`` batches tokenize in that many forked workers (fork hands them the
    memory-mapped texts and the tokenizer without copying)."""
    counts: Counter[str] = Counter()
    kept = 0
    with contextlib.ExitStack() as stack:
        if processes > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(processes, _start_worker, (job,)))
            results = pool.imap(_run_worker, range(0, len(job.order), BATCH_ROWS))
        else:
            results = map(job, range(0, len(job.order), BATCH_ROWS))
        writer = stack.enter_context(ArrowWriter(path=str(path), writer_batch_size=BATCH_ROWS))
        for columns, batch_counts in results:
            counts.update(batch_counts)
            kept += len(columns["prompt_ids"])
            writer.write_batch(columns)  # a batch that lost every pair to drop_long writes nothing
        if not kept:
            return None, counts
        writer.finalize()
    return datasets.Dataset.from_file(str(path)), counts


# ---------------------------------------------------------------------------------------
# The data module


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """Load a tokenizer; give it a pad token if it has none (padding is masked out anyway)."""
    require_pretrained(name_or_path, "model")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if tokenizer.pad_token_id is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            log.warning("tokenizer %s had no pad, EOS or UNK token: added '<pad>'", name_or_path)
    if chat_template is not None:
        path = Path(chat_template).expanduser()
        tokenizer.chat_template = path.read_text() if path.is_file() else chat_template
    return tokenizer


def chat_renderer(tokenizer: PreTrainedTokenizerBase):
    """``render(messages, add_generation_prompt) -> str`` with the tokenizer's chat template, or None."""
    if not tokenizer.chat_template:
        return None
    return lambda messages, add_generation_prompt: tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else repr(tokenizer.get_vocab())]
    parts += [str(tokenizer.chat_template), str(tokenizer.all_special_tokens), str(tokenizer.eos_token_id)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _source_fingerprint(source: str) -> str:
    path = Path(source).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if path.is_dir():
        return ";".join(
            f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.rglob("*")) if p.is_file()
        )
    return f"hub:{source}"


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (or SFT texts) for every objective in this package.

    Args:
        train_file: JSONL/JSON/CSV/parquet file, ``save_to_disk`` directory, or hub dataset id.
        val_file: Validation data in the same forms; or use ``val_fraction``.
        val_fraction: Fraction of ``train_file`` held out for validation (seeded), in (0, 1).
        tokenizer: Tokenizer path or hub id (linked to the model path by the CLI).
        prompt_column, chosen_column, rejected_column: Column names; ``rejected_column=None``
            reads SFT data (prompt and chosen response only).
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
            order stays shuffled beyond stretches of 64 batches). The share of padding tokens
            is logged either way.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float | None = None,
        tokenizer: str | None = None,
        prompt_column: str = "prompt",
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
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if val_fraction is not None and val_file is not None:
            raise ValueError("give either val_file or val_fraction, not both")
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
        if not 0.0 <= label_flip_rate <= 1.0:
            raise ValueError(f"label_flip_rate must be in [0, 1], got {label_flip_rate}")
        if tokenizer is None:
            raise ValueError("a tokenizer path or hub id is required (the CLI links it to the model path)")
        if (chosen_score_column is None) != (rejected_score_column is None):
            raise ValueError("give both chosen_score_column and rejected_score_column, or neither")
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"num_proc must be at least 1, got {num_proc}")
        self.save_hyperparameters()
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
        processes = max(1, min(hp.num_proc or free_cores(), len(order) // ROWS_PER_PROCESS))
        log.info("tokenizing %d %s pairs in %d process(es)", len(order), name, processes)
        job = SplitTokenizer(texts, order, flipped, self.tokenizer, settings)
        dataset, counts = tokenize_split(job, work / f"{name}.arrow", processes)
        if counts:
            log.info("%s split: %d pairs kept of %d; %s", name, len(dataset or ()), len(order), dict(counts))
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
                raise ValueError("label_flip_rate needs preference pairs (rejected_column is None)")
            n_train = len(splits["train"][1])
            flipped = frozenset(flip_indices(n_train, hp.label_flip_rate, hp.seed))
            log.info("flipped the labels of %d of %d training pairs (seed %d)", len(flipped), n_train, hp.seed)
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
            self._build(staging)
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
