"""Label-noise models: ``uniform`` (an exact fraction at random), ``bt`` (every label resampled from
Bradley-Terry on the pair's margin) and ``low_margin`` (an exact fraction, the smallest |margin|),
as pure functions and through the data module; flipping rows held as dicts."""

from __future__ import annotations

import logging
import math
import random

import pytest
from conftest import fit_argv
from data_support import SCORES, as_tuples, flipped_positions, make_dm, setup_dm, write_csv

from drdo_lightning.cli import main
from drdo_lightning.data.noise import (
    against_margin_indices,
    bt_flip_indices,
    flip_indices,
    flip_rows,
    low_margin_flip_indices,
    noise_flip_indices,
    swap_row,
)
from drdo_lightning.errors import DataError, SettingError
from drdo_lightning.jsonl import write_jsonl


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- the pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize("n, rate, seed", [(96, 0.25, 0), (96, 0.25, 1), (10, 0.0, 3), (10, 1.0, 3), (7, 0.5, 11)])
def test_uniform_is_todays_rule_bit_for_bit(n, rate, seed):
    today = random.Random(seed).sample(range(n), round(rate * n))  # flip_indices as it always was
    assert flip_indices(n, rate, seed) == today
    assert noise_flip_indices("uniform", n, rate=rate, seed=seed) == today


def test_low_margin_flips_exactly_the_smallest_margins():
    margins = [3.0, -0.1, 0.5, -2.0, 0.1, 0.0, 1.0, -0.5]
    # |Δ| ascending: 5 (0), 1 and 4 (0.1, by position), 2 and 7 (0.5, by position), 6, 3, 0
    assert low_margin_flip_indices(margins, 0.5) == [1, 2, 4, 5]
    assert low_margin_flip_indices(margins, 0.25) == [1, 5]
    assert low_margin_flip_indices(margins, 0.375) == [1, 4, 5]
    assert low_margin_flip_indices(margins, 0.625) == [1, 2, 4, 5, 7]
    assert low_margin_flip_indices(margins, 0.0) == []
    assert low_margin_flip_indices(margins, 1.0) == list(range(8))
    assert noise_flip_indices("low_margin", 8, rate=0.5, margins=margins, seed=99) == [1, 2, 4, 5]  # no seed involved


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.33, 0.5, 0.77, 1.0])
def test_low_margin_flips_exactly_round_rate_n(rate):
    margins = [random.Random(5).uniform(-3, 3) for _ in range(101)]
    flipped = low_margin_flip_indices(margins, rate)
    assert len(flipped) == round(rate * 101) == len(set(flipped))
    kept = set(range(101)) - set(flipped)
    assert all(abs(margins[i]) <= abs(margins[j]) for i in flipped for j in kept)


def test_bt_is_deterministic_by_seed():
    margins = [random.Random(1).gauss(0, 0.5) for _ in range(400)]
    a, b, c = (bt_flip_indices(margins, 2.0, seed) for seed in (0, 0, 1))
    assert a == b and a != c
    assert bt_flip_indices(margins, 2.0, random.Random(0)) == a  # a Random seeded alike draws alike
    assert noise_flip_indices("bt", 400, margins=margins, temperature=2.0, seed=0) == a


def test_bt_at_zero_temperature_flips_half():
    n = 4000
    margins = [random.Random(2).uniform(-5, 5) for _ in range(n)]
    flipped = len(bt_flip_indices(margins, 0.0, seed=0))
    assert abs(flipped - n / 2) <= 4 * math.sqrt(n / 4)  # binomial(n, 1/2), 4 standard deviations


def test_bt_at_huge_temperature_follows_the_margin_sign():
    positive = [0.01, 0.5, 3.0, 1e-3] * 50
    assert bt_flip_indices(positive, 1e9, seed=0) == []  # large margins stay put
    negative = [-m for m in positive]
    assert bt_flip_indices(negative, 1e9, seed=0) == list(range(len(negative)))  # labels against the margin turn


@pytest.mark.parametrize("margin, temperature", [(0.0, 5.0), (0.1, 5.0), (0.3, 2.0), (-0.2, 5.0), (1.0, 1.0)])
def test_bt_flip_frequency_matches_the_sigmoid(margin, temperature):
    seeds = 3000
    flips = sum(bool(bt_flip_indices([margin], temperature, seed)) for seed in range(seeds))
    p = 1 - sigmoid(temperature * margin)
    assert abs(flips / seeds - p) <= 4 * math.sqrt(p * (1 - p) / seeds) + 1e-9


def test_against_margin_flips_exactly_the_pairs_a_scorer_ranks_the_other_way():
    margins = [0.5, -0.1, 0.0, -3.0, 2.0]
    assert against_margin_indices(margins) == [1, 3]  # a tie keeps its label
    untied = [m for m in margins if m != 0]
    assert against_margin_indices(untied) == bt_flip_indices(untied, 1e9, seed=0) == [1, 2]  # bt's s -> inf limit


def test_a_flipped_row_swaps_every_chosen_rejected_column_pair_and_keeps_its_order():
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "gold_chosen": 0.1, "gold_rejected": 0.3,
           "ensemble_chosen": [1.0, 2.0], "ensemble_rejected": [3.0, 4.0], "chosenness": 7, "label_flipped": False}
    flipped = swap_row(row)
    assert list(flipped) == list(row) and row["chosen"] == "a"  # a new row, columns in their order
    assert (flipped["chosen"], flipped["rejected"], flipped["gold_chosen"], flipped["gold_rejected"]) == ("b", "a", 0.3, 0.1)
    assert (flipped["ensemble_chosen"], flipped["ensemble_rejected"]) == ([3.0, 4.0], [1.0, 2.0])
    assert (flipped["prompt"], flipped["chosenness"], flipped["label_flipped"]) == ("p", 7, False)
    assert swap_row(flipped) == row
    rows = [dict(row, prompt=str(i)) for i in range(4)]
    assert flip_rows(rows, [3, 1], mark="label_flipped") == 2
    assert [r["label_flipped"] for r in rows] == [False, True, False, True]
    assert [r["chosen"] for r in rows] == ["a", "b", "a", "b"] and [r["prompt"] for r in rows] == ["0", "1", "2", "3"]


def test_pure_functions_reject_bad_settings():
    with pytest.raises(ValueError, match="noise_temperature"):
        bt_flip_indices([0.1], -1.0, 0)
    with pytest.raises(ValueError, match="noise_temperature"):
        bt_flip_indices([0.1], math.nan, 0)
    for rate in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_flip_rate"):
            low_margin_flip_indices([0.1], rate)
    with pytest.raises(ValueError, match="one margin per pair"):
        noise_flip_indices("bt", 3, margins=[0.1])
    with pytest.raises(ValueError, match="label_noise must be one of"):
        noise_flip_indices("gaussian", 3, margins=[0.1] * 3)


# --- through the data module -------------------------------------------------------------------


@pytest.fixture(scope="module")
def margin_files(tmp_path_factory, tiny_task) -> dict:
    """24 training pairs with a margin column (the gold difference) and an untouched validation file."""
    root = tmp_path_factory.mktemp("margins")
    train = [dict(r, gold_margin=r["gold_chosen"] - r["gold_rejected"]) for r in tiny_task["train"][:24]]
    return {"train": write_jsonl(root / "train.jsonl", train), "val": write_jsonl(root / "val.jsonl", tiny_task["val"]),
            "margins": [r["gold_margin"] for r in train]}


def _noise_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.getMessage().startswith("label noise:")]


@pytest.mark.parametrize("noise, settings, expected", [
    ("low_margin", dict(label_flip_rate=0.25), lambda m: low_margin_flip_indices(m, 0.25)),
    ("bt", dict(noise_temperature=5.0, seed=3), lambda m: bt_flip_indices(m, 5.0, 3)),
])
def test_the_data_module_flips_exactly_the_expected_training_pairs(noise, settings, expected, margin_files,
                                                                   tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    kw = dict(val_file=str(margin_files["val"]), **SCORES)
    base = setup_dm(margin_files["train"], tiny_model_dir, **kw)
    caplog.clear()
    noisy = setup_dm(margin_files["train"], tiny_model_dir, label_noise=noise, noise_margin_column="gold_margin",
                     **settings, **kw)
    want = expected(margin_files["margins"])
    assert want and len(want) < 24  # the check below can tell
    assert flipped_positions(base.train_dataset, noisy.train_dataset) == want
    assert as_tuples(noisy.val_dataset) == as_tuples(base.val_dataset)  # validation never changes
    (warning,) = _noise_warnings(caplog)
    assert warning.startswith(f"label noise: swapped chosen and rejected (and their scores) in {len(want)} of 24 "
                              f"training pairs (label_noise {noise} on margin gold_margin, ")


def test_score_columns_give_the_margin_and_val_fraction_keeps_validation(pair_files, tiny_model_dir):
    """The margin as chosen minus rejected score; with val_fraction the flips follow the training order."""
    kw = dict(val_fraction=0.25, seed=4, **SCORES)
    base = setup_dm(pair_files["train"], tiny_model_dir, **kw)
    noisy = setup_dm(pair_files["train"], tiny_model_dir, label_noise="low_margin", label_flip_rate=0.3,
                     noise_score_columns=["gold_chosen", "gold_rejected"], **kw)
    margins = [ex["chosen_score"] - ex["rejected_score"] for ex in base.train_dataset]  # oracle = gold in the tests
    assert flipped_positions(base.train_dataset, noisy.train_dataset) == low_margin_flip_indices(margins, 0.3)
    assert as_tuples(noisy.val_dataset) == as_tuples(base.val_dataset)


def test_a_margin_from_csv_text(tmp_path, tiny_task, tiny_model_dir):
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} | {"margin": r["gold_chosen"] - r["gold_rejected"]}
            for r in tiny_task["train"][:12]]
    path = write_csv(tmp_path / "train.csv", rows)
    base = setup_dm(path, tiny_model_dir)
    noisy = setup_dm(path, tiny_model_dir, label_noise="low_margin", label_flip_rate=0.5, noise_margin_column="margin")
    assert flipped_positions(base.train_dataset, noisy.train_dataset) == low_margin_flip_indices(
        [r["margin"] for r in rows], 0.5)


def test_the_count_is_told_once_per_load_and_the_cache_key_holds_the_settings(margin_files, tmp_path, tiny_model_dir,
                                                                              caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    kw = dict(cache_dir=str(tmp_path / "cache"), noise_margin_column="gold_margin")

    def load(**settings):
        dm = make_dm(margin_files["train"], tiny_model_dir, **kw, **settings)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    first = load(label_noise="bt", noise_temperature=2.0)
    (built,) = _noise_warnings(caplog)
    caplog.clear()
    again = load(label_noise="bt", noise_temperature=2.0)
    assert again.cache_path() == first.cache_path()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "label noise" in r.getMessage()] \
        == [f"{built} (tokenized data from the cache)"]
    assert as_tuples(again.train_dataset) == as_tuples(first.train_dataset)
    others = [
        make_dm(margin_files["train"], tiny_model_dir, **kw, label_noise="bt", noise_temperature=3.0),
        make_dm(margin_files["train"], tiny_model_dir, **kw, label_noise="low_margin", label_flip_rate=0.2),
        make_dm(margin_files["train"], tiny_model_dir, cache_dir=kw["cache_dir"], label_noise="bt",
                noise_temperature=2.0, noise_score_columns=["gold_chosen", "gold_rejected"]),
        make_dm(margin_files["train"], tiny_model_dir, cache_dir=kw["cache_dir"]),
    ]
    paths = {dm.cache_path() for dm in [first, *others]}
    assert len(paths) == 5
    # uniform is keyed as before the margin-based models existed: their settings change nothing there
    uniform = make_dm(margin_files["train"], tiny_model_dir, cache_dir=kw["cache_dir"], noise_temperature=9.0)
    assert uniform.cache_path() == others[-1].cache_path()


@pytest.mark.parametrize("settings, message", [
    (dict(label_noise="bt"), "label_noise bt needs the pairs' margin: give noise_margin_column"),
    (dict(label_noise="low_margin", label_flip_rate=0.1), "label_noise low_margin needs the pairs' margin"),
    (dict(label_noise="bt", noise_margin_column="m", noise_score_columns=["a", "b"]), "not both; both were given"),
    (dict(label_noise="bt", noise_margin_column="m", noise_temperature=-1.0),
     "noise_temperature must be a finite number >= 0, got -1.0"),
    (dict(label_noise="bt", noise_margin_column="m", noise_temperature=math.inf), "noise_temperature must be"),
    (dict(label_noise="low_margin", noise_margin_column="m", label_flip_rate=1.5),
     r"label_flip_rate must be in \[0, 1\], got 1.5"),
    (dict(label_noise="low_margin", noise_margin_column="m", label_flip_rate=-0.1), "label_flip_rate must be in"),
    (dict(label_noise="bt", noise_margin_column="m", label_flip_rate=0.2), "label_flip_rate 0.2 is for uniform"),
    (dict(noise_margin_column="m"), "read only by label_noise bt or low_margin"),
    (dict(label_noise="bt", noise_score_columns=["a", "b", "c"]), "noise_score_columns takes two columns"),
    (dict(label_noise="gaussian", noise_margin_column="m"), "label_noise must be one of uniform, bt, low_margin"),
    (dict(label_noise="bt", noise_margin_column="m", rejected_column=None), "label_noise bt needs preference pairs"),
])
def test_bad_settings_are_one_line_setting_errors(settings, message, margin_files, tiny_model_dir):
    with pytest.raises(SettingError, match=message) as error:
        make_dm(margin_files["train"], tiny_model_dir, **settings)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value, detail", [
    (None, "expected a finite number, got None"),
    ("0.4", "got the text '0.4'"),
    ("high", "got the text 'high'"),
    ([0.1, 0.2], "expected one number"),
    (math.nan, "expected a finite number, got nan"),
])
def test_a_bad_margin_names_the_file_row_and_field(value, detail, tmp_path, tiny_task, tiny_model_dir):
    rows = [dict(r, gold_margin=0.5) for r in tiny_task["train"][:6]]
    rows[3]["gold_margin"] = value
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as error:
        setup_dm(path, tiny_model_dir, label_noise="bt", noise_margin_column="gold_margin")
    text = str(error.value)
    assert text.startswith(f"{path}: row 4: field 'gold_margin': ") and detail in text and "\n" not in text
    skipped = setup_dm(path, tiny_model_dir, label_noise="bt", noise_margin_column="gold_margin", on_bad_row="skip")
    assert len(skipped.train_dataset) == 5


def test_a_missing_margin_column_and_one_missing_from_a_row(tmp_path, tiny_task, tiny_model_dir):
    path = write_jsonl(tmp_path / "train.jsonl", tiny_task["train"][:4])
    with pytest.raises(DataError, match=r"missing column\(s\) \['gold_margin'\]"):
        setup_dm(path, tiny_model_dir, label_noise="low_margin", label_flip_rate=0.5, noise_margin_column="gold_margin")
    rows = [dict(r, gold_margin=0.5) for r in tiny_task["train"][:4]]
    del rows[2]["gold_margin"]
    path = write_jsonl(tmp_path / "partial.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}: row 3: field 'gold_margin': expected a finite number, got None"):
        setup_dm(path, tiny_model_dir, label_noise="low_margin", label_flip_rate=0.5, noise_margin_column="gold_margin")


def test_the_command_line_takes_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "drdo", "--data.label_noise", "bt", "--data.noise_score_columns",
              "[gold_chosen, gold_rejected]", "--data.noise_temperature", "5", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "label_noise: bt" in printed and "noise_temperature: 5.0" in printed and "- gold_chosen" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "drdo", "--data.label_noise", "low_margin", "--data.noise_margin_column", "gold_margin",
              "--data.label_flip_rate", "0.2", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "noise_margin_column: gold_margin" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "drdo", "--data.label_noise", "gaussian", "--print_config"])
    assert exit_info.value.code != 0


def test_a_bad_setting_from_the_command_line_is_one_line(tmp_path, tiny_model_dir, pairs16, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(fit_argv(tmp_path, tiny_model_dir, pairs16, "--data.label_noise", "bt"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: label_noise bt needs the pairs' margin: give noise_margin_column")
