"""Loading preference data at scale: memory stays flat as rows grow, and workers change nothing.

The memory test runs ``benchmarks/data_scale.py``'s measured load (``prepare_data``: read,
validate, tokenize, cache) in fresh subprocesses on N and 4N rows of the benchmark's
Ultrafeedback-shaped pairs. Loading that held every row's texts and token ids in Python lists
grew by about 170 kB a row there (some 250 MB from N to 4N); streaming through Arrow files grows
by the pages of those files the load touches. No timings are asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from data_support import as_tuples, data_counts, make_dm

import drdo_lightning
from drdo_lightning.data import building
from drdo_lightning.jsonl import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "data_scale.py"
N = 300  # more than data.BATCH_ROWS, so both loads tokenize full batches
GROWTH_LIMIT_MB = 60  # list-based loading grows some 150 MB from N to 4N rows


def _benchmark():
    spec = importlib.util.spec_from_file_location("data_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_rss_mb(data: Path, cache: Path, tokenizer: Path) -> float:
    """Peak resident memory of a fresh process that loads ``data`` (the drdo_lightning this test imports)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(drdo_lightning.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", str(data), "--cache-dir", str(cache), "--tokenizer", str(tokenizer)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_main_mb"]


def test_peak_memory_does_not_grow_with_rows(tmp_path, tiny_model_dir):
    bench = _benchmark()
    peaks = {}
    for rows in (N, 4 * N):
        data = bench.write_pairs(tmp_path / f"pairs_{rows}.jsonl", rows, seed=0)
        peaks[rows] = _peak_rss_mb(data, tmp_path / f"cache_{rows}", tiny_model_dir)
    growth = peaks[4 * N] - peaks[N]
    assert growth < GROWTH_LIMIT_MB, f"peak RSS grew {growth:.0f} MB from {N} to {4 * N} rows: {peaks}"


def test_worker_processes_build_what_one_process_builds(pair_files, tiny_model_dir, monkeypatch, caplog):
    """Batches split across forked workers (small batches and a small per-process share, so the tiny
    data uses several) give the same pairs, flips, validation split and counts as one process."""
    kw = dict(val_fraction=0.25, label_flip_rate=0.25, max_prompt_length=8, max_length=72, drop_long=True,
              chosen_score_column="oracle_chosen", rejected_score_column="oracle_rejected")
    monkeypatch.setattr(building, "BATCH_ROWS", 7)
    built = {}
    for processes in (1, 3):
        monkeypatch.setattr(building, "ROWS_PER_PROCESS", 10 if processes > 1 else 10**9)
        caplog.clear()
        caplog.set_level("INFO", logger="drdo_lightning.data")
        dm = make_dm(pair_files["train"], tiny_model_dir, num_proc=processes, **kw)
        dm.setup("fit")
        assert f"in {processes} process(es)" in caplog.text
        built[processes] = (as_tuples(dm.train_dataset), as_tuples(dm.val_dataset), data_counts(caplog))
    assert built[1] == built[3]
    assert built[1][2]["dropped_too_long"] > 0  # counts from every batch of every worker are summed


def test_cache_holds_only_the_tokenized_splits(tiny_task, tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", tiny_task["train"][:16])
    dm = make_dm(train, tiny_model_dir, cache_dir=str(tmp_path / "cache"), val_fraction=0.25)
    dm.prepare_data()
    (entry,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["notices.json", "train.arrow", "val.arrow"]  # no texts
