"""The in-process API: run_fit layers a recipe over the base, merges overrides, and reports from the trainer."""

from __future__ import annotations

import math

import yaml

from pathlib import Path

from drdo_lightning.training import DataSpec, RunSpec, run_fit


def test_run_fit_merges_overrides_into_the_recipe_and_reports_from_the_trainer(tmp_path, tiny_model_dir, pairs16):
    overrides = {
        "model.model": str(tiny_model_dir), "data.train_file": str(pairs16), "data.val_file": str(pairs16),
        "data.batch_size": 8, "data.cache_dir": str(tmp_path / "cache"), "trainer.max_steps": 2,
        "trainer.val_check_interval": 1.0, "trainer.enable_progress_bar": False,
    }
    run_dir = tmp_path / "run"
    first = run_fit("drdo", overrides, run_dir=run_dir)
    assert first.run_dir == run_dir and first.global_step == 2
    assert first.export_dir == run_dir / "export" and (first.export_dir / "reward_head.safetensors").is_file()
    assert first.checkpoint_dir == run_dir / "checkpoints" and (first.checkpoint_dir / "last.ckpt").is_file()
    assert math.isfinite(first.metrics["train/loss"]) and math.isfinite(first.stage_metrics("val")["loss"])

    # The overrides changed their keys only: the base's callbacks and logger are all still there.
    saved = yaml.safe_load((first.log_dir / "config.yaml").read_text())
    callbacks = {c["class_path"]: c["init_args"] for c in saved["trainer"]["callbacks"]}
    assert callbacks["lightning.pytorch.callbacks.ModelCheckpoint"]["every_n_train_steps"] == 50
    assert callbacks["drdo_lightning.ExportHuggingFace"]["dirpath"] == str(run_dir / "export")
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(run_dir)
    assert saved["model"]["init_args"]["alpha"] == 0.1 and saved["data"]["batch_size"] == 8

    # A second run into the same folder is a new log version, and reports its own metrics.
    second = run_fit(["drdo", "ablations/gamma0"], {**overrides, "trainer.max_steps": 1}, run_dir=run_dir)
    assert second.log_dir != first.log_dir and second.global_step == 1
    assert yaml.safe_load((second.log_dir / "config.yaml").read_text())["model"]["init_args"]["gamma"] == 0.0


def test_a_run_spec_is_the_dotted_keys_of_its_fields_with_the_memory_rule_in_one_place():
    run = RunSpec(("dpo", "strategies/fsdp"), run_dir=Path("runs/x"), model=Path("m"), train_file="t.jsonl",
                  data=DataSpec(max_prompt_length=8, max_length=16), label_flip_rate=0.2, flip_seed=0, seed=3,
                  max_steps=5, validate=False, overrides={"trainer.max_steps": 7, "model.beta": 0.5})
    assert run.layers() == ["dpo", "strategies/fsdp"]
    assert run.settings() == {
        "seed_everything": 3, "model.model": "m", "data.train_file": "t.jsonl", "data.label_flip_rate": 0.2,
        "data.seed": 0, "trainer.max_steps": 7, "trainer.default_root_dir": "runs/x", "data.max_prompt_length": 8,
        "data.max_length": 16, "data.chat_template": None, "trainer.limit_val_batches": 0, "model.beta": 0.5,
    }  # unset fields stay out; overrides win over the fields
    # One model in memory: a reference-based objective precomputes its reference, a reference-free one has none.
    assert RunSpec("dpo", one_model_in_memory=True).settings() == {"model.precompute_reference": True}
    assert RunSpec("simpo", one_model_in_memory=True).settings() == {}
    assert RunSpec("dpo").settings() == {}

