"""The tracker presets in ``configs/loggers/``: a recipe logs to TensorBoard or W&B (offline) as
well as to the CSV log, the same values."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import wandb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_export import fit_args

from drdo_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_with_preset(tmp_path, tiny_model_dir, pairs16, monkeypatch):
    """``run(preset)``: 4 DRDO steps with the preset's loggers, which write into the run folder
    ``tmp_path/run`` (not the working directory); returns the CLI and the CSV log's training
    losses ``{step: loss}``."""
    monkeypatch.chdir(tmp_path)

    def run(preset: str):
        cli = main([*fit_args(tmp_path / "run", tiny_model_dir, pairs16, "--trainer.max_epochs", "2"),
                    "--config", str(ROOT / "configs" / "loggers" / f"{preset}.yaml")])
        assert not (tmp_path / "runs").exists()  # nothing shared by every run in the working directory
        (metrics,) = (tmp_path / "run" / "logs").rglob("metrics.csv")  # the CSV log stays
        with metrics.open() as f:
            losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}
        assert len(losses) == 4
        return cli, losses

    return run


def test_tensorboard_preset_logs_every_step(run_with_preset, tmp_path):
    _, losses = run_with_preset("tensorboard")
    (events,) = (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload().Scalars("train/loss")
    assert {s.step: s.value for s in scalars} == pytest.approx(losses)


def test_wandb_preset_logs_offline(run_with_preset, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli, losses = run_with_preset("wandb")
    run = cli.trainer.loggers[1].experiment
    try:
        assert run.settings.mode == "offline"
        assert run.summary["train/loss"] == pytest.approx(losses[max(losses)])  # the last step's loss
        assert run.summary["trainer/global_step"] == max(losses)
        assert run.config["model"] == str(tiny_model_dir) and run.config["batch_size"] == 8  # module and data
    finally:
        wandb.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))  # for `wandb sync`
