"""LoRA adapters (peft) for every objective: what trains, the reference, export and resume.

Single process, in-process CLI runs on the tiny model; then LoRA under DeepSpeed ZeRO-2/3 and
FSDP on 2 CPU processes, compared with one process as in ``test_deepspeed.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_baselines import args, losses_of, scored_pairs  # noqa: F401 (a fixture)
from test_deepspeed import (
    assert_same_losses,
    assert_trained_alike,
    cli,
    run,
    sequence_outputs,
    strategy_args,
    training_pairs,
)
from test_export import STEPS, STOP, fit_args, logged
from transformers import AutoModelForCausalLM

from drdo_lightning import DRDO, CausalLMWithRewardHead, lora
from drdo_lightning.cli import main
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.heads import sequence_values
from drdo_lightning.objectives.reference import reference_of

LORA = "{r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear}"
ORACLE = ("--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected")
ENSEMBLE = ("--data.chosen_score_column", "ensemble_chosen", "--data.rejected_score_column", "ensemble_rejected")


def first_pairs(datamodule, n: int = 8) -> dict[str, torch.Tensor]:
    return PairCollator(datamodule.tokenizer.pad_token_id)([datamodule.train_dataset[i] for i in range(n)])


def logps_and_rewards(model: CausalLMWithRewardHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Chosen responses' log-probs and rewards (rewards only when the model has a head)."""
    with torch.no_grad():
        logps, rewards, *_ = sequence_values(model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    return (logps,) if rewards is None else (logps, rewards)


def test_lora_option_takes_short_names_and_loraconfig_fields():
    config = lora.lora_config({"alpha": 8, "dropout": 0.1, "use_rslora": True})
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (16, 8, 0.1, True)
    assert lora.lora_config({"lora_alpha": 64, "target_modules": ["q_proj"]}).lora_alpha == 64
    assert lora.lora_config({}).target_modules == "all-linear"


@pytest.mark.parametrize(
    "objective, extra",
    [
        ("SFT", ("--model.gradient_checkpointing", "true")),
        ("OracleRewardModel", ()),
        ("DRDO", ORACLE),
        ("DPO", ()),
        ("IPO", ()),
        ("Distill", ORACLE),
        ("EDPO", ENSEMBLE),
        ("CDPO", ()),
        ("RDPO", ("--model.precompute_reference", "true")),
        ("RPO", ()),
        ("SimPO", ()),
        ("ORPO", ("--model.nll_on_prompt", "true")),
    ],
)
def test_every_objective_trains_the_adapters_and_reward_head_only(tmp_path, tiny_model_dir, scored_pairs, objective, extra):
    cli = main(args(tmp_path, tiny_model_dir, objective, scored_pairs, "--trainer.max_steps", "2", "--model.lora", LORA, *extra))
    module, policy = cli.model, cli.model.policy
    assert torch.tensor(losses_of(cli)).isfinite().all()

    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    head = {"reward_head.weight", "reward_head.bias"}
    assert (head <= trainable) == module.needs.reward_head
    adapters = trainable - head
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in policy.parameters() if p.requires_grad}

    # The LM's own weights are the starting model's; the adapters moved (B starts at zero).
    start = load_file(tiny_model_dir / "model.safetensors")
    base = lora.base_weights(policy.state_dict())
    for name, value in start.items():
        torch.testing.assert_close(base[f"lm.{name}"], value, rtol=0, atol=0, msg=name)
    assert all(p.abs().sum() > 0 for n, p in policy.named_parameters() if ".lora_B." in n)
    assert getattr(module, "reference", None) is None  # reference-based objectives hold no copy


def test_lora_config_fields_in_yaml_choose_the_adapted_layers(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "lora.yaml"
    config.write_text("model:\n  lora: {r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj]}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--model", "DRDO", "--model.model", str(tiny_model_dir), "--config", str(config), "--print_config"])
    assert "lora_alpha: 4" in capsys.readouterr().out
    module = DRDO(str(tiny_model_dir), lora={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1})
    module.configure_model()
    adapted = {n.split(".")[-4] for n, _ in module.policy.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj"}
    # disable_dropout zeroes the model's dropout, not the adapters' own.
    dropouts = {n.split(".")[-2]: m.p for n, m in module.policy.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert dropouts == {"lora_dropout": 0.1}


def test_reference_is_the_base_model_with_adapters_off_live_or_precomputed(tmp_path, tiny_model_dir, scored_pairs):
    live = main(args(tmp_path / "live", tiny_model_dir, "DPO", scored_pairs, "--trainer.max_steps", "6", "--model.lora", LORA))
    pre = main(args(tmp_path / "pre", tiny_model_dir, "DPO", scored_pairs, "--trainer.max_steps", "6", "--model.lora", LORA,
                    "--model.precompute_reference", "true"))
    live_loss = losses_of(live)
    assert live_loss[0] == pytest.approx(math.log(2), abs=1e-4)  # adapters start as the identity
    assert live_loss[-1] < live_loss[0]
    assert losses_of(pre) == pytest.approx(live_loss, abs=1e-5)  # precomputed from the base model: the same

    module = live.model
    batch = first_pairs(live.datamodule)
    base = CausalLMWithRewardHead.from_pretrained(tiny_model_dir, reward_head=False).eval()
    with torch.no_grad():
        want = module.forward_pairs(batch, model=base)
        trained = module.forward_pairs(batch)
    reference = reference_of(module.prepare_batch(batch))
    torch.testing.assert_close(reference, (want.chosen_logps, want.rejected_logps))
    assert not torch.allclose(trained.chosen_logps, reference[0], atol=1e-3)  # the policy moved away from it
    with torch.no_grad():  # and the adapters are back on afterwards
        torch.testing.assert_close(module.forward_pairs(batch).chosen_logps, trained.chosen_logps, rtol=0, atol=0)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, pairs16):
    """8 LoRA DRDO steps, checkpointed, exported by the callback merged and as an adapter."""
    root = tmp_path_factory.mktemp("lora_run")
    cli = main(fit_args(
        root, tiny_model_dir, pairs16, "--model.lora", LORA,
        "--trainer.callbacks+=drdo_lightning.ExportHuggingFace", "--trainer.callbacks.dirpath", str(root / "merged"),
        "--trainer.callbacks+=drdo_lightning.ExportHuggingFace", "--trainer.callbacks.dirpath", str(root / "adapter"),
        "--trainer.callbacks.adapter", "true",
    ))
    return cli, root


def test_merged_export_loads_with_transformers_alone_and_computes_the_lora_policy(lora_run):
    cli, root = lora_run
    policy = cli.model.policy.eval()
    merged = root / "merged"
    assert {"model.safetensors", "reward_head.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    assert not (merged / "adapter_config.json").exists()
    batch = first_pairs(cli.datamodule)
    ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    lm = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, attention_mask=mask).logits, policy.lm(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)
    # With the reward head: the trained policy's log-probs and rewards.
    exported = CausalLMWithRewardHead.from_pretrained(merged).eval()
    for got, want in zip(logps_and_rewards(exported, batch), logps_and_rewards(policy, batch), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_adapter_export_loads_with_peft_onto_the_base_model(lora_run, tiny_model_dir):
    cli, root = lora_run
    policy = cli.model.policy.eval()
    adapter = root / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "reward_head.safetensors", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert not (adapter / "model.safetensors").exists()  # the base weights are not copied
    batch = first_pairs(cli.datamodule)
    ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    peft_lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_lm(input_ids=ids, attention_mask=mask).logits,
                                   policy.lm(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    # The adapter directory names its base model, so the project loads it on its own, head included.
    exported = CausalLMWithRewardHead.from_pretrained(adapter).eval()
    for got, want in zip(logps_and_rewards(exported, batch), logps_and_rewards(policy, batch), strict=True):
        torch.testing.assert_close(got, want)


def test_export_command_writes_what_the_callback_wrote(lora_run, tmp_path):
    _, root = lora_run
    checkpoint = str(root / "checkpoints" / "last.ckpt")
    main(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "merged")])
    main(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "adapter"), "--adapter", "true"])
    for kind, weights in (("merged", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        for name in (weights, "reward_head.safetensors"):
            torch.testing.assert_close(load_file(tmp_path / kind / name), load_file(root / kind / name), rtol=0, atol=0)


def test_adapter_export_of_full_fine_tuning_is_refused(tmp_path, tiny_model_dir, scored_pairs):
    checkpoint = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"policy.lm.w": torch.zeros(1)}, "hyper_parameters": {"model": str(tiny_model_dir)}}, checkpoint)
    with pytest.raises(ValueError, match="needs a LoRA run"):
        main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--adapter", "true"])
    with pytest.raises(ValueError, match="needs LoRA training"):  # before any step
        main(args(tmp_path, tiny_model_dir, "SFT", scored_pairs, "--trainer.callbacks+=drdo_lightning.ExportHuggingFace",
                  "--trainer.callbacks.adapter", "true"))


def test_resume_from_a_lora_checkpoint_continues_with_the_same_losses(tmp_path, tiny_model_dir, pairs16, lora_run):
    reference, reference_root = lora_run
    main(fit_args(tmp_path, tiny_model_dir, pairs16, "--model.lora", LORA,
                  "--trainer.callbacks+=probes.StopAfterSteps", "--trainer.callbacks.steps", str(STOP)))
    resumed = main(fit_args(tmp_path, tiny_model_dir, pairs16, "--model.lora", LORA, "--ckpt_path", "last"))
    assert resumed.trainer.global_step == STEPS
    trajectory = {**logged(tmp_path, "train/loss", 0), **logged(tmp_path, "train/loss", 1)}
    assert min(logged(tmp_path, "train/loss", 1)) == STOP
    assert trajectory == pytest.approx(logged(reference_root, "train/loss"), rel=1e-6)
    torch.testing.assert_close(resumed.model.policy.state_dict(), reference.model.policy.state_dict())


@pytest.mark.parametrize("preset", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_lora_on_two_processes_matches_one(preset, tmp_path, tiny_model_dir, pairs16, lora_run):
    """Sharded LoRA training: each step's loss over 2 CPU ranks x 4 pairs is the single process's on 8."""
    reference, reference_root = lora_run
    args = strategy_args(tmp_path, tiny_model_dir, pairs16, preset, "--model.lora", LORA,
                         "--trainer.callbacks+=drdo_lightning.ExportHuggingFace")
    run(cli(*args), tmp_path)
    assert_same_losses(logged(tmp_path, "probe/loss"), logged(reference_root, "train/loss"))
    # The merged export, gathered from the shards at the end of fit, is what one process trains,
    # and `export` of the sharded checkpoint writes the same.
    exported = CausalLMWithRewardHead.from_pretrained(tmp_path / "export").eval()
    pairs = training_pairs(reference.datamodule)
    assert_trained_alike(exported, reference.model.policy.eval(), pairs)
    main(["export", "--checkpoint", str(tmp_path / "checkpoints" / "last.ckpt"), "--output", str(tmp_path / "hf")])
    from_checkpoint = CausalLMWithRewardHead.from_pretrained(tmp_path / "hf").eval()
    for got, want in zip(sequence_outputs(from_checkpoint, pairs), sequence_outputs(exported, pairs), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_with_adapters_off_under_zero3_matches_one_process(tmp_path, tiny_model_dir, pairs16):
    """DPO with LoRA under ZeRO-3, where a frozen copy of the policy is refused: the base model with
    its adapters off is the reference, run through the same sharded weights."""
    dpo = ("--model", "DPO", "--model.lora", LORA)
    one = main(fit_args(tmp_path / "one", tiny_model_dir, pairs16, *dpo))
    assert one.model.reference is None
    want = logged(tmp_path / "one", "train/loss")
    assert want[0] == pytest.approx(math.log(2), abs=1e-4)
    run(cli(*strategy_args(tmp_path, tiny_model_dir, pairs16, "deepspeed_zero3", *dpo)), tmp_path)
    assert_same_losses(logged(tmp_path, "probe/loss"), want)
