"""End-to-end: the CLI trains, logs, checkpoints and exports; configs parse; scoring writes columns."""

from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

import progress
import pytest
import torch
import yaml
from conftest import fit_argv

import drdo_lightning
from drdo_lightning import CausalLMWithRewardHead, logprobs
from drdo_lightning.cli import COMMANDS, docstring_summary, load, main
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.errors import UserError
from drdo_lightning.recipes import LAYER_FOLDERS
from drdo_lightning.scoring import score

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def fit_args(tmp_path: Path, model_dir: Path, objective: str, train: Path, *extra: str) -> list[str]:
    return fit_argv(tmp_path, model_dir, train, *extra, objective=objective, checkpoints=True, export=True)


def read_metrics(root: Path) -> list[dict]:
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def command_for(config: Path) -> list[str]:
    """How a user runs this YAML: layered over the DRDO recipe, as a function command, or alone."""
    rel = config.relative_to(ROOT / "configs")
    if rel.parts[0] in LAYER_FOLDERS:
        return ["fit", "--config", str(ROOT / "configs/drdo.yaml"), "--config", str(config)]
    if rel.stem in COMMANDS:
        return [rel.stem, "--config", str(config)]
    keys = yaml.safe_load(config.read_text())
    if "conditions" in keys:  # a configuration of the experiment engine
        return ["protocol", "--config", str(config)]
    if "frontier" in keys:  # an overlay of the frontier's run
        return ["protocol", "--config", str(ROOT / "configs/frontier.yaml"), "--config", str(config)]
    return ["fit", "--config", str(config)]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_every_config_parses_with_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command_for(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    top_keys = {line.split(":")[0] for line in config.read_text().splitlines() if line and line[0].isalpha()}
    assert top_keys and all(f"{key}:" in printed for key in top_keys)
    if command_for(config)[0] == "fit":
        assert "class_path: drdo_lightning." in printed and "default_root_dir:" in printed


def test_command_line_overrides_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/drdo.yaml"), "--model.alpha", "1.0", "--trainer.max_steps", "10", "--print_config"])
    printed = capsys.readouterr().out
    assert "alpha: 1.0" in printed and "max_steps: 10" in printed


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/drdo.yaml"), "--model.alhpa", "1.0"])
    assert exit_info.value.code != 0
    assert "alhpa" in capsys.readouterr().err


def test_drdo_fit_overfits_checkpoints_and_exports(tmp_path, tiny_model_dir, pairs16):
    cli = main(
        fit_args(
            tmp_path, tiny_model_dir, "DRDO", pairs16,
            "--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected",
            "--data.batch_size", "16", "--model.learning_rate", "1e-2", "--trainer.max_steps", "40",
        )
    )
    rows = read_metrics(tmp_path)
    loss = series(rows, "train/loss")
    assert len(loss) == 40 and torch.tensor(loss).isfinite().all()
    # Full-batch overfit of 16 pairs: the loss falls and the distillation term nearly vanishes.
    assert loss[-1] < 0.7 * loss[0]
    distillation = series(rows, "train/distillation")
    assert distillation[-1] < 0.1 * distillation[0]
    for key in ("train/distillation", "train/preference", "train/p_chosen", "train/reward_accuracy",
                "train/implicit_accuracy", "train/chosen_logps", "train/rejected_logps", "train/reward_corr"):
        assert series(rows, key), key
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    (saved,) = tmp_path.glob("lightning_logs/version_*/config.yaml")  # what reruns the run names the plugin's home
    assert yaml.safe_load(saved.read_text())["trainer"]["plugins"] == [
        {"class_path": "drdo_lightning.reliability.AtomicCheckpointIO"}]

    export = tmp_path / "export"
    assert {"config.json", "model.safetensors", "reward_head.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}
    reloaded = CausalLMWithRewardHead.from_pretrained(export).eval()
    trained = cli.model.policy.eval()
    batch = PairCollator(cli.datamodule.tokenizer.pad_token_id)([cli.datamodule.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        a = trained(batch["chosen_input_ids"], batch["chosen_attention_mask"])
        b = reloaded(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    torch.testing.assert_close(a.rewards, b.rewards)
    torch.testing.assert_close(
        logprobs.sequence_logps(a.logits, batch["chosen_labels"]), logprobs.sequence_logps(b.logits, batch["chosen_labels"])
    )
    # The student's reward head learned to rank the pairs as the Oracle does.
    assert series(rows, "train/reward_accuracy")[-1] >= 0.75


def test_sft_then_oracle_then_score(tmp_path, tiny_model_dir, pair_files, pairs16):
    sft_root, oracle_root = tmp_path / "sft", tmp_path / "oracle"
    main(fit_args(sft_root, tiny_model_dir, "SFT", pair_files["sft"], "--data.rejected_column", "null",
                  "--model.learning_rate", "3e-3", "--trainer.max_steps", "30"))
    sft_loss = series(read_metrics(sft_root), "train/loss")
    assert sft_loss[-1] < sft_loss[0]
    assert not (sft_root / "export" / "reward_head.safetensors").exists()

    main(fit_args(oracle_root, sft_root / "export", "OracleRewardModel", pairs16,
                  "--model.learning_rate", "3e-3", "--trainer.max_steps", "30"))
    oracle_rows = read_metrics(oracle_root)
    assert series(oracle_rows, "train/reward_accuracy")[-1] >= 0.75
    oracle_dir = oracle_root / "export"

    before = hashlib.sha256(pairs16.read_bytes()).hexdigest()
    out = tmp_path / "scored.jsonl"
    main(["score", "--models", json.dumps([str(oracle_dir)] * 2), "--data", str(pairs16), "--output", str(out), "--batch_size", "5",
          "--output_prefix", "ensemble_"])
    assert hashlib.sha256(pairs16.read_bytes()).hexdigest() == before
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    original = [json.loads(line) for line in pairs16.read_text().splitlines()]
    assert [{k: r[k] for k in o} for r, o in zip(scored, original)] == original

    model = CausalLMWithRewardHead.from_pretrained(oracle_dir).eval()
    tok = model_tokenizer(oracle_dir)
    for row in scored[:4]:
        for side in ("chosen", "rejected"):
            ids = tok(row["prompt"])["input_ids"] + tok(row[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                want = model.rewards(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
            assert row[f"ensemble_{side}"] == pytest.approx([want, want], abs=1e-5)

    with pytest.raises(UserError, match="never overwrites"):
        score([str(oracle_dir)], str(pairs16), str(pairs16))


def model_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_shipped_drdo_recipe_runs_on_the_embedded_default(tmp_path):
    """The README's main job, shortened: the shipped assets and configs/drdo.yaml work together."""
    cli = main(
        [
            "fit", "--config", str(ROOT / "configs/drdo.yaml"),
            "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "3",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "cache"),
        ]
    )
    assert cli.trainer.global_step == 3
    assert (tmp_path / "export" / "reward_head.safetensors").is_file()
    assert cli.trainer.callback_metrics["val/loss"].isfinite()


@pytest.mark.parametrize("recipe", ["online_drdo", "online_dpo", "online_ipo"])
def test_shipped_online_recipes_run_on_the_embedded_default(recipe, tmp_path):
    """README's online block, shortened: each online recipe samples, scores with the shipped Oracle and trains."""
    cli = main(
        [
            "fit", "--config", str(ROOT / f"configs/{recipe}.yaml"),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false", "--data.batch_size", "4",
            "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "cache"),
        ]
    )
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert metrics["train/online/pairs"] > 0 and metrics["train/online/reward"].isfinite()
    assert 0 < metrics["train/online/length"] <= cli.model.online.max_new_tokens
    # The sampler cuts prompts to the data's budget: one prompt budget, the data module's.
    assert cli.model.online_source.sampler.max_prompt_length == cli.datamodule.hparams.max_prompt_length == 64
    assert metrics["val/loss"].isfinite() and metrics["train/online/kl"].isfinite()
    rows = [json.loads(line) for line in next(tmp_path.rglob("samples.jsonl")).read_text().splitlines()]
    assert rows and {"prompt", "response", "score"} <= set(rows[0])
    assert (tmp_path / "export" / "config.json").is_file()


@pytest.mark.parametrize("precision, state_bytes", [("bf16-mixed", 8), ("bf16-true", 4)])
def test_bf16_precisions_train_with_a_float32_reward_head(precision, state_bytes, tmp_path, tiny_model_dir, pairs16):
    """bf16-mixed keeps fp32 weights (computes in bf16); bf16-true stores weights and AdamW state in bf16."""
    cli = main(fit_args(tmp_path, tiny_model_dir, "DRDO", pairs16, "--trainer.precision", precision,
                        "--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected",
                        "--data.batch_size", "16", "--model.learning_rate", "1e-2", "--trainer.max_steps", "6", "--trainer.gradient_clip_val", "1.0"))
    loss = series(read_metrics(tmp_path), "train/loss")
    assert len(loss) == 6 and torch.tensor(loss).isfinite().all() and loss[-1] < loss[0]
    policy = cli.model.policy
    lm_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {p.dtype for p in policy.lm.parameters()} == {lm_dtype}
    assert {p.dtype for p in policy.reward_head.parameters()} == {torch.float32}
    optimizer = cli.trainer.optimizers[0]
    lm_params = list(policy.lm.parameters())
    state = [t for p in lm_params for k, t in optimizer.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
    assert sum(t.numel() * t.element_size() for t in state) == state_bytes * sum(p.numel() for p in lm_params)
    out = policy(*(torch.ones(1, 3, dtype=torch.long),) * 2)
    assert out.rewards.dtype == torch.float32


HELP_GROUPS = {
    "training": ["fit", "validate"],
    "data and models": ["score", "export", "train-ensemble"],
    "evaluation": ["evaluate"],
    "experiments": ["protocol", "ablations", "splits", "paper-pipeline"],
    "embedded default": ["build-embedded-default"],
}


def test_help_lists_every_command_by_group_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed: dict[str, list[str]] = {}
    group = None
    for line in capsys.readouterr().out.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            group = listed.setdefault(line[:-1], [])
        elif line.startswith("  ") and group is not None:
            name, summary = line.split(maxsplit=1)
            assert summary.endswith(".") or summary.endswith(")"), line  # a whole sentence on one line
            group.append(name)
    assert listed == HELP_GROUPS and sorted(sum(HELP_GROUPS.values(), [])) == sorted(COMMANDS)


# Runs the command line as `python -m drdo_lightning ARGS` does, then names the heavy packages it imported.
IMPORTS_OF_A_RUN = """
import runpy, sys
try:
    runpy.run_module("drdo_lightning", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    print("exit", exit.code)
print("imported", *sorted({"torch", "lightning", "transformers", "datasets"} & set(sys.modules)))
"""


@pytest.mark.parametrize("args, code", [(["--help"], 0), ([], 2), (["nope"], 2), (["test", "--config", "drdo"], 2)])
def test_help_and_an_unknown_command_import_no_torch(args, code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = progress.run([sys.executable, "-c", IMPORTS_OF_A_RUN, *args], cwd=ROOT, env=env)
    *printed, exit_line, imported = proc.stdout.splitlines()
    assert (exit_line, imported) == (f"exit {code}", "imported")
    if args[:1] == ["--help"] or not args:
        assert printed[0].startswith("usage: python -m drdo_lightning COMMAND") and "recipes: " in printed[-1]
    else:
        assert f"error: unknown command {args[0]!r}" in proc.stderr


def test_the_listed_summary_is_the_first_line_of_the_function_docstring():
    for target in ("scoring:score", "experiments.pipeline:paper_pipeline"):
        assert docstring_summary(target) == inspect.getdoc(load(target)).splitlines()[0]
    with pytest.raises(LookupError, match="no function nope"):
        docstring_summary("scoring:nope")


def test_the_package_exports_each_public_name_from_its_module():
    for name, module in drdo_lightning.PUBLIC.items():
        assert getattr(drdo_lightning, name) is getattr(importlib.import_module(f"drdo_lightning.{module}"), name)
    assert set(drdo_lightning.__all__) == set(drdo_lightning.PUBLIC) <= set(dir(drdo_lightning))
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        drdo_lightning.Nope  # noqa: B018


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0 and "--config" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["test", "predict"])
def test_commands_without_a_use_are_not_offered(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--config", "drdo"])
    assert exit_info.value.code == 2 and f"unknown command '{name}'" in capsys.readouterr().err


def test_config_takes_a_recipe_name_or_a_path(capsys):
    for config in ("drdo", str(ROOT / "configs" / "drdo.yaml")):
        with pytest.raises(SystemExit):
            main(["fit", "--config", config, "--config", "ablations/gamma0", "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["init_args"]["gamma"] == 0.0 and printed["trainer"]["default_root_dir"] == "runs/drdo"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "drdoo"])
    assert exit_info.value.code == 2 and "--config drdoo: no such file, nor a shipped recipe" in capsys.readouterr().err


def test_the_base_lies_under_recipes_not_under_a_layer_alone(capsys):
    for configs, with_base in ((["strategies/deepspeed_zero2"], False), (["drdo", "strategies/deepspeed_zero2"], True)):
        with pytest.raises(SystemExit):
            main(["fit", *(a for c in configs for a in ("--config", c)), "--print_config"])
        printed = capsys.readouterr().out
        assert ("every_n_train_steps: 50" in printed) == with_base and "stage: 2" in printed


def test_a_missing_optional_package_is_one_line_naming_its_extra(tmp_path, tiny_model_dir, pairs16, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: importing it raises ModuleNotFoundError
    with pytest.raises(SystemExit) as exit_info:
        main(fit_argv(tmp_path, tiny_model_dir, pairs16, "--trainer.max_steps", "1", "--model.lora", "{r: 4}",
                      "--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'error: peft is not installed; it comes with `pip install -e ".[peft]"` (or `pip install peft`)')


def test_a_misspelt_command_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["protocl"])
    assert exit_info.value.code == 2
    assert "unknown command 'protocl'; did you mean protocol?" in capsys.readouterr().err
