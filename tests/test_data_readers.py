"""Reading rows: every input format, configurable column names."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil
from pathlib import Path

import datasets
import pytest
from data_support import SCORES, as_tuples, hf_cache, make_dm, reference_pair, rows, setup_dm, tok, write_csv  # noqa: F401 (fixtures)

from drdo_lightning.data.readers import read_rows
from drdo_lightning.errors import DataError, MissingPathError
from drdo_lightning.jsonl import write_jsonl

# --- 1. input formats --------------------------------------------------------------------------


def _write_format(fmt: str, rows: list[dict], root: Path) -> Path:
    if fmt == "jsonl":
        return write_jsonl(root / "d.jsonl", rows)
    if fmt == "json":
        path = root / "d.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path
    if fmt == "csv":
        return write_csv(root / "d.csv", rows)
    if fmt == "parquet":
        path = root / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return path
    if fmt == "disk_dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(root / "ds"))
        return root / "ds"
    if fmt == "disk_datasetdict":
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:3])}
        ).save_to_disk(str(root / "dsd"))
        return root / "dsd"
    raise AssertionError(fmt)


def test_jsonl_matches_independent_tokenization(pair_files, tiny_task, tiny_model_dir, tok):
    dm = setup_dm(pair_files["train"], tiny_model_dir, **SCORES)
    assert len(dm.train_dataset) == len(tiny_task["train"])
    for ex, row in zip(dm.train_dataset, tiny_task["train"]):
        prompt, (chosen, rejected), _ = reference_pair(tok, row)
        assert ex["prompt_ids"] == prompt
        assert ex["chosen_ids"] == chosen and ex["rejected_ids"] == rejected
        assert ex["chosen_ids"][-1] == tok.eos_token_id
        assert ex["chosen_score"] == row["oracle_chosen"] and ex["rejected_score"] == row["oracle_rejected"]
    assert dm.val_dataset is None and dm.val_dataloader() == []


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet", "disk_dataset", "disk_datasetdict"])
def test_every_format_yields_the_same_pairs(fmt, rows, tmp_path, tiny_model_dir, hf_cache):
    reference = setup_dm(_write_format("jsonl", rows, tmp_path), tiny_model_dir, **SCORES)
    path = _write_format(fmt, rows, tmp_path)
    dm = setup_dm(path, tiny_model_dir, **SCORES)
    assert as_tuples(dm.train_dataset) == as_tuples(reference.train_dataset)
    assert len(dm.train_dataset) == len(rows)
    # CSV scores are strings on disk; they must come back as the same floats.
    scores = [ex["chosen_score"] for ex in dm.train_dataset]
    assert all(isinstance(s, float) for s in scores)
    assert scores == [r["oracle_chosen"] for r in rows]


def test_datasetdict_splits(rows, tmp_path, tiny_model_dir):
    path = _write_format("disk_datasetdict", rows, tmp_path)
    dm = setup_dm(path, tiny_model_dir, val_file=str(path))  # val from the "validation" split
    assert len(dm.train_dataset) == len(rows) and len(dm.val_dataset) == 3
    assert as_tuples(dm.val_dataset) == as_tuples(dm.train_dataset)[:3]
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'validation'\]"):
        setup_dm(path, tiny_model_dir, split="test")


def test_csv_bad_score_names_line(rows, tmp_path, tiny_model_dir):
    bad = [dict(r) for r in rows[:4]]
    bad[1]["oracle_rejected"] = "high"
    path = write_csv(tmp_path / "bad.csv", bad)
    with pytest.raises(DataError) as e:
        setup_dm(path, tiny_model_dir, **SCORES)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg and "'oracle_rejected'" in msg and "'high'" in msg


# --- 2. column names ---------------------------------------------------------------------------


def test_configurable_column_names(rows, tmp_path, tiny_model_dir):
    renamed = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "s_good": r["oracle_chosen"],
         "s_bad": r["oracle_rejected"]}
        for r in rows
    ]
    reference = setup_dm(write_jsonl(tmp_path / "ref.jsonl", rows), tiny_model_dir, **SCORES)
    dm = setup_dm(
        write_jsonl(tmp_path / "renamed.jsonl", renamed), tiny_model_dir, prompt_column="question",
        chosen_column="good", rejected_column="bad", chosen_score_column="s_good", rejected_score_column="s_bad",
    )
    assert as_tuples(dm.train_dataset) == as_tuples(reference.train_dataset)
    # The default names are missing from this file: the error lists what is there.
    with pytest.raises(DataError) as e:
        setup_dm(tmp_path / "renamed.jsonl", tiny_model_dir)
    msg = str(e.value)
    assert "missing column(s) ['prompt', 'chosen', 'rejected']" in msg
    assert "['bad', 'good', 'question', 's_bad', 's_good']" in msg and "renamed.jsonl" in msg


def test_only_one_score_column_is_rejected(pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match="both chosen_score_column and rejected_score_column"):
        make_dm(pair_files["train"], tiny_model_dir, chosen_score_column="oracle_chosen")


# --- 3. layouts as downloaded, compression, encodings ------------------------------------------


def _hub_folder(root: Path, rows: list[dict], fmt: str = "parquet") -> Path:
    """A dataset laid out as a hub download: README.md and data/<split>-0000N-of-0000M.<fmt>."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n# Pairs\n", encoding="utf-8")
    shards = {"train-00000-of-00002": rows[:5], "train-00001-of-00002": rows[5:12],
              "validation-00000-of-00001": rows[12:]}
    for name, part in shards.items():
        shard = datasets.Dataset.from_list(part)
        path = str(root / "data" / f"{name}.{fmt}")
        shard.to_parquet(path) if fmt == "parquet" else shard.to_json(path)
    return root


def _rows_of(source, split: str = "train") -> list[dict]:
    return [row for _, row in read_rows(source, split)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_hub_folder_reads_the_requested_split(fmt, rows, tmp_path):
    folder = _hub_folder(tmp_path / "download", rows, fmt)
    assert _rows_of(str(folder)) == rows[:12]  # both train shards, in order
    assert _rows_of(str(folder), "validation") == rows[12:]
    numbers = [str(n) for n, _ in read_rows(str(folder))]
    assert numbers[0] == f"1 in data/train-00000-of-00002.{fmt}"
    assert numbers[5] == f"1 in data/train-00001-of-00002.{fmt}"
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'validation'\]"):
        read_rows(str(folder), "test")


def test_folder_without_split_names_is_the_train_split(rows, tmp_path):
    folder = tmp_path / "download"
    write_jsonl(folder / "part-b.jsonl", rows[4:])
    write_jsonl(folder / "part-a.jsonl", rows[:4])
    (folder / "README.md").write_text("# Pairs\n", encoding="utf-8")
    assert _rows_of(folder) == rows


def test_hub_folder_in_the_data_module_names_shard_and_row(rows, tmp_path, tiny_model_dir):
    folder = _hub_folder(tmp_path / "download", rows)
    dm = setup_dm(folder, tiny_model_dir, val_file=str(folder))
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == len(rows) - 12
    bad = [dict(r) for r in rows]
    bad[6]["rejected"] = bad[6]["chosen"]  # the second row of the second train shard
    folder = _hub_folder(tmp_path / "bad", bad)
    with pytest.raises(DataError) as e:
        setup_dm(folder, tiny_model_dir)
    assert f"{folder}: row 2 in data/train-00001-of-00002.parquet: field 'rejected'" in str(e.value)


@pytest.mark.parametrize("contents", [[], ["README.md"], ["README.md", "notes.txt"]])
def test_folder_without_data_files(contents, tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    for name in contents:
        (folder / name).write_text("text\n", encoding="utf-8")
    with pytest.raises(MissingPathError) as e:
        read_rows(str(folder))
    msg = str(e.value)
    assert str(folder) in msg and "no data files" in msg
    assert all(kind in msg for kind in (".jsonl", ".json", ".csv", ".parquet", "save_to_disk"))


def test_glob_and_list_of_files(rows, tmp_path):
    data = _hub_folder(tmp_path / "download", rows) / "data"
    assert _rows_of(str(data / "train-*.parquet")) == rows[:12]
    files = [str(data / "validation-00000-of-00001.parquet"), str(data / "train-00000-of-00002.parquet")]
    assert _rows_of(files) == rows[12:] + rows[:5]  # a list is read in the order given
    with pytest.raises(MissingPathError, match=r"test-\*\.parquet.*no data files"):
        read_rows(str(data / "test-*.parquet"))
    with pytest.raises(MissingPathError, match="absent.parquet"):
        read_rows([files[0], str(data / "absent.parquet")])


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz", "d.csv.gz", "d.csv.bz2", "d.jsonl.xz", "d.JSONL", "d.CSV",
                                  "d.PARQUET"])
def test_compressed_and_upper_case_names(name, rows, tmp_path):
    plain = _write_format(name.split(".")[1].lower(), rows, tmp_path)
    path = tmp_path / "named" / name
    path.parent.mkdir()
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}.get(name.split(".")[-1])
    if compress:
        path.write_bytes(compress(plain.read_bytes()))
    else:
        shutil.copy(plain, path)
    assert _rows_of(str(path)) == _rows_of(str(plain))
    if compress:
        path.write_bytes(b"not compressed")
        with pytest.raises(DataError, match=re.escape(f"{path}: not a readable")):
            list(read_rows(str(path)))


def test_file_of_a_type_not_read_is_named(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("prompt\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: not a file type read here (it reads .jsonl, .json")):
        read_rows(str(path))


def test_json_lines_under_a_json_name(rows, tmp_path):
    path = tmp_path / "d.json"
    datasets.Dataset.from_list(rows).to_json(str(path))  # JSON Lines, whatever the name says
    assert list(read_rows(str(path))) == list(enumerate(rows, start=1))
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-3]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: malformed JSON")):
        list(read_rows(str(path)))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_file_not_in_utf8_names_file_and_line(fmt, rows, tmp_path):
    accented = [dict(r) for r in rows[:4]]
    accented[2]["prompt"] = "Un café " + accented[2]["prompt"]
    if fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(accented, indent=1, ensure_ascii=False), encoding="utf-8")
    else:
        path = _write_format(fmt, accented, tmp_path)
    text = path.read_text(encoding="utf-8")
    line = next(i for i, s in enumerate(text.split("\n"), start=1) if "café" in s)
    path.write_bytes(text.encode("latin-1"))  # what an editor set to Windows-1252/Latin-1 saves
    with pytest.raises(DataError) as e:
        list(read_rows(str(path)))
    msg = str(e.value)
    assert f"{path}: line {line}: not UTF-8" in msg and "re-save it as UTF-8" in msg


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_byte_order_mark_is_not_part_of_the_first_column(fmt, rows, tmp_path):
    path = _write_format(fmt, rows[:3], tmp_path)
    expected = _rows_of(str(path))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what spreadsheet programs write
    assert _rows_of(str(path)) == expected and "prompt" in expected[0]
