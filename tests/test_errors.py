"""User errors end every command in one line: the path or data at fault, what fixes it, in the
option of the running command, exit status 2 and no traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import progress
import pytest

from drdo_lightning import CausalLMWithRewardHead
from drdo_lightning.cli import main
from drdo_lightning.data.tokenization import load_tokenizer
from drdo_lightning.jsonl import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
# On PYTHONPATH, hides the packages named in $HIDE_PACKAGES as an environment without them has none:
# no module to import and no installed distribution (which Lightning's requirement checks read).
HIDE_PACKAGES = """
import importlib.metadata, os, sys
hidden = set(filter(None, os.environ["HIDE_PACKAGES"].split(",")))
sys.modules.update(dict.fromkeys(hidden))
from_name = importlib.metadata.Distribution.from_name.__func__
def without_hidden(cls, name):
    if name in hidden:
        raise importlib.metadata.PackageNotFoundError(name)
    return from_name(cls, name)
importlib.metadata.Distribution.from_name = classmethod(without_hidden)
"""


def user_error(argv: list[str], capsys) -> str:
    """The one line a command failing on a user error prints."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def conversations(tmp_path_factory, tiny_task) -> Path:
    """Pairs in the conversational (TRL) layout."""
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in tiny_task["train"][:8]]
    return write_jsonl(tmp_path_factory.mktemp("conversations") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    path = tmp_path_factory.mktemp("reward") / "model"
    CausalLMWithRewardHead.from_pretrained(tiny_model_dir).save_pretrained(path, tokenizer=load_tokenizer(str(tiny_model_dir)))
    return path


def test_score_names_its_own_chat_template_option(tmp_path, reward_model, conversations, capsys):
    line = user_error(["score", "--models", json.dumps([str(reward_model)]), "--data", str(conversations),
                       "--output", str(tmp_path / "out.jsonl")], capsys)
    assert f"{conversations}: row 1: field 'chosen': conversational rows need a tokenizer with a chat template" in line
    assert line.endswith("(give one with --chat_template)")


def test_fit_names_the_data_modules_chat_template_option(tmp_path, tiny_model_dir, conversations, capsys):
    line = user_error(["fit", "--model", "DPO", "--model.model", str(tiny_model_dir), "--data.train_file", str(conversations),
                       "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.logger", "false", "--trainer.max_steps", "1"], capsys)
    assert "row 1: field 'chosen'" in line and line.endswith("(give one with --data.chat_template)")


def test_a_bad_row_names_the_skip_option_of_the_command(tmp_path, tiny_model_dir, reward_model, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    fit = user_error(["fit", "--model", "DPO", "--model.model", str(tiny_model_dir), "--data.train_file", str(bad),
                      "--data.cache_dir", "null", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
                     capsys)
    assert fit.endswith("identical (--data.on_bad_row skip skips such rows)")
    scored = user_error(["score", "--models", json.dumps([str(reward_model)]), "--data", str(bad),
                         "--output", str(tmp_path / "out.jsonl")], capsys)
    assert scored.endswith("identical (--on_bad_row skip skips such rows)")


def test_evaluate_before_training_names_the_missing_policy_and_its_command(tmp_path, monkeypatch, capsys):
    os.symlink(ROOT / "embedded_default", tmp_path / "embedded_default")
    monkeypatch.chdir(tmp_path)
    line = user_error(["evaluate", "--config", "evaluate"], capsys)
    assert line == ("error: policy 'drdo': runs/drdo/export does not exist: "
                    "train it with `python -m drdo_lightning fit --config drdo`")


def test_a_recipe_run_outside_the_checkout_names_the_embedded_default_build(tmp_path, monkeypatch, capsys):
    """From a folder without embedded_default/, its paths are local and missing, never hub ids."""
    monkeypatch.chdir(tmp_path)
    line = user_error(["fit", "--config", "drdo"], capsys)
    assert line == ("error: model embedded_default/sft_policy does not exist: "
                    "build the embedded default with `python -m drdo_lightning build-embedded-default`")
    line = user_error(["fit", "--config", "drdo", "--model.model", str(ROOT / "embedded_default" / "sft_policy")], capsys)
    assert line == ("error: data file not found: embedded_default/data/train.jsonl: "
                    "build the embedded default with `python -m drdo_lightning build-embedded-default`")


def test_missing_models_name_the_path_and_what_makes_it(tmp_path, tiny_model_dir, pair_files, capsys):
    missing = tmp_path / "nothing" / "here"
    line = user_error(["fit", "--model", "SFT", "--model.model", str(missing), "--data.train_file", str(pair_files["sft"]),
                       "--data.rejected_column", "null"], capsys)
    assert line.startswith(f"error: model {missing} does not exist: train it with")
    line = user_error(["score", "--models", json.dumps([str(missing)]), "--data", str(pair_files["val"]),
                       "--output", str(tmp_path / "out.jsonl")], capsys)
    assert line.startswith(f"error: reward model {missing} does not exist: train one with")
    line = user_error(["score", "--models", json.dumps([str(tiny_model_dir)]), "--data", str(pair_files["val"]),
                       "--output", str(tmp_path / "out.jsonl")], capsys)
    assert line.startswith(f"error: {tiny_model_dir} is not a reward model: it has no reward_head.safetensors")
    assert "not a sequence classifier with one label" in line and "train one with" in line
    line = user_error(["export", "--checkpoint", str(missing / "last.ckpt"), "--output", str(tmp_path / "x")], capsys)
    assert line.startswith(f"error: checkpoint {missing / 'last.ckpt'} does not exist")


def test_experiments_print_data_errors_with_their_own_options(tmp_path, pair_files, capsys):
    line = user_error(["splits", "--data", str(pair_files["val"]), "--out", str(tmp_path)], capsys)
    assert line == f"error: {pair_files['val']}: no rows with a confidence value (name the confidence field with --confidence_column)"
    line = user_error(["splits", "--data", str(tmp_path / "absent.jsonl")], capsys)
    assert line == f"error: data file not found: {tmp_path / 'absent.jsonl'}"


@pytest.mark.parametrize(("extra", "expect"), [
    (["--data.max_prompt_length", "64", "--data.max_length", "64"],
     "error: need 0 < max_prompt_length < max_length (the prompt's budget leaves room for the response), "
     "got max_prompt_length 64 and max_length 64"),
    (["--data.val_fraction", "0.1"],  # next to the recipe's val_file
     "error: give either val_file or val_fraction, not both (a recipe's val_file is set aside with --data.val_file null)"),
])
def test_data_settings_that_cannot_work_are_one_line(extra, expect, capsys):
    assert user_error(["fit", "--config", "drdo", *extra], capsys) == expect


@pytest.mark.parametrize(("preset", "hidden"), [("tensorboard", "tensorboard,tensorboardX"), ("wandb", "wandb")])
def test_a_tracker_preset_without_its_package_names_the_install(preset, hidden, tmp_path):
    """The command a user runs, in a fresh process without the tracker: one line before anything runs
    (no seed, no model loaded), not jsonargparse's 'Not a valid subclass of Logger' traceback."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_PACKAGES)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    proc = progress.run(
        [sys.executable, "-m", "drdo_lightning", "fit", "--config", "drdo", "--config", f"loggers/{preset}",
         "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path, "HIDE_PACKAGES": hidden, "OMP_NUM_THREADS": "1"},
    )
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        f'error: {preset} is not installed; it comes with `pip install -e ".[trackers]"` (or `pip install {preset}`)'])
    assert not (tmp_path / "run").exists()
