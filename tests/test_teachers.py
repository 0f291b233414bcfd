"""Teachers as good as the data allows: the Oracle and reward-model recipes validate as they train,
keep and export their best checkpoint by validation reward accuracy, and stop early; under label
noise the stages select them on a held-out split carrying the same noise."""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from conftest import fit_argv
from data_support import SCORES, as_tuples, flipped_positions, make_dm, setup_dm
from safetensors.torch import load_file

from drdo_lightning import stages
from drdo_lightning.cli import main
from drdo_lightning.data.noise import bt_flip_indices, flip_indices, low_margin_flip_indices
from drdo_lightning.errors import SettingError
from drdo_lightning.export import read_checkpoint
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.recipes import read_config
from drdo_lightning.training import DataSpec, FitResult, RunSpec, run_fit


def exported_weights(export_dir: Path) -> dict[str, torch.Tensor]:
    """An export's weights under the policy's keys (``lm.*``, ``reward_head.*``)."""
    weights = {f"lm.{k}": v for k, v in load_file(export_dir / "model.safetensors").items()}
    head = export_dir / "reward_head.safetensors"
    if head.is_file():
        weights.update({f"reward_head.{k}": v for k, v in load_file(head).items()})
    return weights


def same_weights(export_dir: Path, checkpoint: dict[str, torch.Tensor]) -> bool:
    exported = exported_weights(export_dir)
    return all(torch.equal(v, checkpoint[k]) for k, v in exported.items())


def validations(log_dir: Path) -> list[tuple[int, float]]:
    """(step, val/reward_accuracy) of every validation a run logged, in order."""
    with (log_dir / "metrics.csv").open() as f:
        return [(int(r["step"]), float(r["val/reward_accuracy"])) for r in csv.DictReader(f) if r.get("val/reward_accuracy")]


# --- the recipes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["oracle", "reward_model"])
def test_the_teacher_recipes_select_stop_early_and_export_the_best(recipe):
    trainer = read_config(recipe)["trainer"]
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in trainer["callbacks"]}
    checkpoints = [c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    best = next(c for c in checkpoints if c.get("monitor"))
    assert (best["monitor"], best["mode"], best["save_top_k"]) == ("val/reward_accuracy", "max", 1)
    assert any(c.get("save_last") for c in checkpoints)  # last.ckpt, for resuming
    early = callbacks["EarlyStopping"]
    assert (early["monitor"], early["mode"]) == ("val/reward_accuracy", "max") and early["patience"] >= 1
    assert callbacks["ExportHuggingFace"]["weights"] == "best"
    # Validation every N batches across epochs: selection within an epoch on small data.
    assert isinstance(trainer["val_check_interval"], int) and trainer["check_val_every_n_epoch"] is None
    assert stages.SELECTION_METRIC == best["monitor"]


def test_the_oracle_recipe_exports_its_best_validated_checkpoint(tmp_path, tiny_model_dir, pair_files):
    overrides = {
        "model.model": str(tiny_model_dir), "model.learning_rate": 1e-2, "model.warmup_steps": 0,
        "data.train_file": str(pair_files["train"]), "data.val_file": str(pair_files["val"]), "data.batch_size": 8,
        "data.cache_dir": str(tmp_path / "cache"), "trainer.max_steps": 10, "trainer.val_check_interval": 2,
        "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
    }
    result = run_fit("oracle", overrides, run_dir=tmp_path / "oracle")
    scores = [score for _, score in validations(result.log_dir)]
    assert len(scores) == 5  # every 2 batches
    best, rest = read_checkpoint(result.checkpoint_dir / "best.ckpt")
    # The run reports the exported checkpoint's validation accuracy and step, next to the last validation's.
    assert result.metrics["selected/val/reward_accuracy"] == pytest.approx(max(scores))
    assert result.metrics["selected/step"] == rest["global_step"] == 2 * (scores.index(max(scores)) + 1)
    assert stages.teacher_validation(result) == {"reward_accuracy": pytest.approx(max(scores)),
                                                 "step": rest["global_step"], "global_step": result.global_step}
    assert same_weights(result.export_dir, best)
    assert (result.checkpoint_dir / "last.ckpt").is_file()


def test_the_export_holds_the_selected_checkpoint_not_the_last_step(tmp_path, tiny_model_dir, pairs16):
    """A monitor whose best is known in advance (the smallest step): the export is that step's weights."""
    root = tmp_path / "run"
    main(fit_argv(root, tiny_model_dir, pairs16, "--data.val_file", str(pairs16), "--model.learning_rate", "1e-2",
                  "--trainer.max_steps", "6", "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch",
                  "null", "--trainer.enable_checkpointing", "true",
                  "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.dirpath", str(root / "checkpoints"), "--trainer.callbacks.monitor", "step",
                  "--trainer.callbacks.mode", "min", "--trainer.callbacks.filename", "best",
                  "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.dirpath", str(root / "checkpoints"), "--trainer.callbacks.save_last", "true",
                  "--trainer.callbacks+=drdo_lightning.ExportHuggingFace", "--trainer.callbacks.weights", "best",
                  objective="OracleRewardModel"))
    best, rest = read_checkpoint(root / "checkpoints" / "best.ckpt")
    last, last_rest = read_checkpoint(root / "checkpoints" / "last.ckpt")
    assert (rest["global_step"], last_rest["global_step"]) == (2, 6)
    assert same_weights(root / "export", best) and not same_weights(root / "export", last)


def test_best_without_a_monitor_is_one_line_and_without_validation_exports_the_final_weights(
        tmp_path, tiny_model_dir, pairs16, capsys):
    export = ["--trainer.callbacks+=drdo_lightning.ExportHuggingFace", "--trainer.callbacks.weights", "best"]
    with pytest.raises(SystemExit) as exit_info:
        main(fit_argv(tmp_path / "a", tiny_model_dir, pairs16, "--trainer.max_steps", "1", *export,
                      objective="OracleRewardModel"))
    assert exit_info.value.code == 2
    assert "ModelCheckpoint with a monitor" in capsys.readouterr().err.strip().splitlines()[-1]

    # No validation data: nothing is selected; the final weights are exported, with a warning.
    root = tmp_path / "b"
    with pytest.warns(UserWarning, match="no validation ran"):
        main(fit_argv(root, tiny_model_dir, pairs16, "--trainer.max_steps", "2", "--trainer.enable_checkpointing",
                      "true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                      "--trainer.callbacks.dirpath", str(root / "checkpoints"), "--trainer.callbacks.monitor",
                      "val/reward_accuracy", "--trainer.callbacks.mode", "max", "--trainer.callbacks.save_last", "true",
                      *export, objective="OracleRewardModel"))
    last, _ = read_checkpoint(root / "checkpoints" / "last.ckpt")
    assert same_weights(root / "export", last)


# --- noise on the validation split ---------------------------------------------------------------


@pytest.fixture(scope="module")
def margin_file(tmp_path_factory, tiny_task) -> Path:
    rows = [dict(r, gold_margin=r["gold_chosen"] - r["gold_rejected"]) for r in tiny_task["train"][:40]]
    return write_jsonl(tmp_path_factory.mktemp("margins") / "train.jsonl", rows)


@pytest.mark.parametrize("noise, settings, expected", [
    ("uniform", dict(label_flip_rate=0.25), lambda m, rng: flip_indices(len(m), 0.25, rng)),
    ("low_margin", dict(label_flip_rate=0.25), lambda m, rng: low_margin_flip_indices(m, 0.25)),
    ("bt", dict(noise_temperature=5.0), lambda m, rng: bt_flip_indices(m, 5.0, rng)),
])
def test_noise_validation_applies_the_training_noise_to_the_carved_validation_split(
        noise, settings, expected, margin_file, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    margin = {} if noise == "uniform" else {"noise_margin_column": "gold_margin"}
    kw = dict(val_fraction=0.5, seed=2, label_noise=noise, **settings, **margin, **SCORES)
    clean = setup_dm(margin_file, tiny_model_dir, val_fraction=0.5, seed=2, **SCORES)
    quiet = setup_dm(margin_file, tiny_model_dir, **kw)
    caplog.clear()
    noisy = setup_dm(margin_file, tiny_model_dir, noise_validation=True, **kw)
    # Training labels as without the option; validation labels flipped by the same model, a stream of their own.
    assert as_tuples(noisy.train_dataset) == as_tuples(quiet.train_dataset)
    assert as_tuples(quiet.val_dataset) == as_tuples(clean.val_dataset)
    margins = [ex["chosen_score"] - ex["rejected_score"] for ex in clean.val_dataset]  # oracle = gold in the tests
    want = expected(margins, random.Random("validation:2"))
    assert want and len(want) < len(margins)
    assert flipped_positions(clean.val_dataset, noisy.val_dataset) == sorted(want)
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("label noise:")]
    assert any(f"in {len(want)} of {len(margins)} validation pairs" in m for m in told)


def test_noise_validation_needs_val_fraction_and_is_in_the_cache_key(margin_file, tiny_model_dir, pair_files):
    with pytest.raises(SettingError, match="noise_validation .* give val_fraction"):
        make_dm(margin_file, tiny_model_dir, val_file=str(pair_files["val"]), label_flip_rate=0.2,
                noise_validation=True)
    kw = dict(val_fraction=0.5, label_flip_rate=0.2, cache_dir="/tmp/cache")
    off, on = make_dm(margin_file, tiny_model_dir, **kw), make_dm(margin_file, tiny_model_dir, noise_validation=True, **kw)
    assert off.cache_path() != on.cache_path()


def test_the_command_line_takes_noise_validation(tmp_path, tiny_model_dir, pairs16, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(fit_argv(tmp_path, tiny_model_dir, pairs16, "--data.label_flip_rate", "0.2", "--data.noise_validation",
                      "true", "--trainer.max_steps", "1", objective="OracleRewardModel"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: noise_validation applies")


# --- the stages ---------------------------------------------------------------------------------


def test_label_noise_is_read_from_the_run_and_its_recipes():
    assert not stages.has_label_noise(RunSpec("oracle"))
    assert not stages.has_label_noise(RunSpec("oracle", label_flip_rate=0.0))
    assert stages.has_label_noise(RunSpec("oracle", label_flip_rate=0.2))
    assert stages.has_label_noise(RunSpec("oracle", overrides={"data.label_noise": "bt"}))
    assert stages.selection_overrides("held_out", 0.2) == {
        "data.val_file": None, "data.val_fraction": 0.2, "data.noise_validation": True}
    assert stages.selection_overrides("val_file", 0.2) == {}
    with pytest.raises(SettingError, match="selection must be"):
        stages.selection_overrides("clean", 0.1)


@pytest.mark.parametrize("rate, selection, held_out", [
    (0.2, "auto", True), (0.0, "auto", False), (0.0, "held_out", True), (0.2, "val_file", False),
])
def test_judges_validate_and_select_on_a_split_as_noisy_as_their_training(tmp_path, monkeypatch, rate, selection,
                                                                           held_out):
    """What the stages ask of each judge's run (run_fit and score stubbed out), and what they report."""
    runs: list[RunSpec] = []

    def fake_fit(run: RunSpec) -> FitResult:
        runs.append(run)
        k = len(runs)
        return FitResult(run.run_dir, Path(run.run_dir) / "export", None, None, 20,
                         {"val/reward_accuracy": 0.5, "selected/val/reward_accuracy": 0.6 + k / 100, "selected/step": 10.0 * k})

    monkeypatch.setattr(stages, "run_fit", fake_fit)
    monkeypatch.setattr(stages, "score", lambda *args, **kwargs: None)
    shared = RunSpec("oracle", data=DataSpec(64, 128), label_flip_rate=rate, flip_seed=0, validate=False, max_steps=125,
                     overrides={"model.learning_rate": 1e-3})
    judges = stages.train_judges_and_score(tmp_path, {"train": Path("t.jsonl"), "val": Path("v.jsonl")}, Path("sft"),
                                           2, shared, selection=selection)
    assert [r.layers()[0] for r in runs] == ["oracle", "reward_model", "reward_model"]
    for run in runs:
        settings = run.settings()
        assert "trainer.limit_val_batches" not in settings and settings["trainer.max_steps"] == 125  # validates; a ceiling
        assert settings["model.learning_rate"] == 1e-3 and settings["data.train_file"] == "t.jsonl"
        if held_out:
            assert settings["data.val_file"] is None and settings["data.noise_validation"] is True
            assert settings["data.val_fraction"] == 0.1
        else:
            assert settings["data.val_file"] == "v.jsonl" and "data.noise_validation" not in settings
    expected_selection = "held_out" if held_out else "val_file"
    assert judges.validation == {
        "oracle": {"reward_accuracy": 0.61, "step": 10, "global_step": 20, "selection": expected_selection},
        "member_0": {"reward_accuracy": 0.62, "step": 20, "global_step": 20, "selection": expected_selection},
        "member_1": {"reward_accuracy": 0.63, "step": 30, "global_step": 20, "selection": expected_selection},
    }
    assert json.loads((tmp_path / "judges.json").read_text()) == judges.validation


def test_judges_trained_under_label_noise_select_on_a_noisy_held_out_split(tmp_path, tiny_model_dir, pair_files):
    """End to end on tiny models: the Oracle and one member validate on the carved split, export their
    best checkpoints, report them, and score the data."""
    shared = RunSpec("oracle", data=DataSpec(64, 128), label_flip_rate=0.25, flip_seed=0, validate=False, max_steps=4,
                     overrides={"data.cache_dir": str(tmp_path / "cache"), "data.batch_size": 8,
                                "trainer.val_check_interval": 2, "trainer.enable_progress_bar": False,
                                "trainer.enable_model_summary": False})
    judges = stages.train_judges_and_score(tmp_path / "judges", {"train": pair_files["train"], "val": pair_files["val"]},
                                           tiny_model_dir, 1, shared)
    assert set(judges.validation) == {"oracle", "member_0"}
    for name, run_dir in (("oracle", "oracle"), ("member_0", "ensemble/member_0")):
        report = judges.validation[name]
        assert report["selection"] == "held_out" and 0 <= report["reward_accuracy"] <= 1 and report["step"] in (2, 4)
        config = next((tmp_path / "judges" / run_dir).rglob("config.yaml")).read_text()
        assert "noise_validation: true" in config and "val_fraction: 0.1" in config and "val_file: null" in config
        assert "label_flip_rate: 0.25" in config
        best, _ = read_checkpoint(tmp_path / "judges" / run_dir / "checkpoints" / "best.ckpt")
        assert same_weights(tmp_path / "judges" / run_dir / "export", best)
    assert all(p.is_file() for p in judges.scored.values())


def test_judges_of_a_subset_run_more_epochs_to_keep_the_step_ceiling_of_all_pairs(tmp_path, monkeypatch):
    """A quarter of the pairs: each recipe's epochs (Oracle 3, reward model 2) times four; at scale 1 unchanged."""
    runs: list[RunSpec] = []
    monkeypatch.setattr(stages, "run_fit", lambda run: runs.append(run) or FitResult(
        run.run_dir, Path(run.run_dir) / "export", None, None, 20, {}))
    monkeypatch.setattr(stages, "score", lambda *args, **kwargs: None)
    data = {"train": Path("t.jsonl"), "val": Path("v.jsonl")}
    for scale in (1.0, 4000 / 932):
        stages.train_judges_and_score(tmp_path / str(scale), data, Path("sft"), 2, RunSpec("oracle", max_steps=375),
                                      selection="val_file", epochs_scale=scale)
    epochs = [r.settings().get("trainer.max_epochs") for r in runs]
    assert epochs == [None, None, None, 13, 9, 9]
    assert [read_config(r)["trainer"]["max_epochs"] for r in ("oracle", "reward_model")] == [3, 2]
