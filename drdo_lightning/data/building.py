"""Building tokenized splits in bounded memory."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
from datasets.arrow_writer import ArrowWriter
from transformers import PreTrainedTokenizerBase

from drdo_lightning.cpu_cores import free_cores_now
from drdo_lightning.data.pairs import TextPair, swap_pair
from drdo_lightning.data.tokenization import ends_in_whitespace, tokenize_pairs

#
# Rows stream from the reader through validation into an Arrow file on disk, and batches of
# them stream through tokenization into another: neither the texts nor the token ids of a
# split are ever held in Python lists all at once (their objects cost some 40 bytes a token),
# so memory stays flat however many rows there are, and batches tokenize in parallel.

BATCH_ROWS = 256  # rows tokenized together: the Python lists of one batch (~40 bytes a token) are what tokenizing holds
ROWS_PER_PROCESS = 5000  # below this many rows a worker costs more to start than it saves


def worker_processes(rows: int, requested: int | None) -> int:
    """Processes to tokenize ``rows`` rows with: ``requested``, or the free cores; at least
    ``ROWS_PER_PROCESS`` rows each, so small data tokenizes in this process."""
    most = rows // ROWS_PER_PROCESS
    if most <= 1:  # one process whatever the machine: no need to measure the free cores
        return 1
    return max(1, min(requested or free_cores_now(), most))


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
