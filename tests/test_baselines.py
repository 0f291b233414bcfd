"""DPO, IPO, distillation and e-DPO through the shared machinery: the reference policy,
precomputed reference log-probs, and the ensemble of reward models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import fit_argv
from safetensors.torch import load_file

from drdo_lightning import DPO, IPO, CausalLMWithRewardHead, PreferenceDataModule
from drdo_lightning.cli import main
from drdo_lightning.experiments.pipeline import write_summary
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.objectives import reference
from drdo_lightning.stages import train_ensemble
from drdo_lightning.training import FitResult


def args(root: Path, model_dir: Path, objective: str, train: Path, *extra: str) -> list[str]:
    return fit_argv(root, model_dir, train, "--data.batch_size", "4", "--model.learning_rate", "1e-2", *extra,
                    objective=objective)


def losses_of(cli) -> list[float]:
    (path,) = Path(cli.trainer.logger.log_dir).glob("metrics.csv")
    header, *lines = path.read_text().splitlines()
    column = header.split(",").index("train/loss")
    return [float(value) for line in lines if (value := line.split(",")[column])]  # validation rows have none


@pytest.fixture(scope="module")
def scored_pairs(tmp_path_factory, tiny_task) -> Path:
    """16 pairs with a single Oracle score and a 3-member ensemble score per response."""
    rng = random.Random(0)
    rows = []
    for row in tiny_task["train"][:16]:
        row = dict(row)
        row["ensemble_chosen"] = [row["oracle_chosen"] + rng.gauss(0, 0.3) for _ in range(3)]
        row["ensemble_rejected"] = [row["oracle_rejected"] + rng.gauss(0, 0.3) for _ in range(3)]
        rows.append(row)
    return write_jsonl(tmp_path_factory.mktemp("scored") / "pairs.jsonl", rows)


def test_dpo_live_reference_equals_precomputed_step_for_step(tmp_path, tiny_model_dir, scored_pairs, monkeypatch):
    monkeypatch.setenv("DRDO_THREADS", "off")  # one thread count in both runs, however busy the machine
    live = main(args(tmp_path / "live", tiny_model_dir, "DPO", scored_pairs, "--trainer.max_steps", "8"))
    pre = main(args(tmp_path / "pre", tiny_model_dir, "DPO", scored_pairs, "--trainer.max_steps", "8",
                    "--model.precompute_reference", "true"))
    assert pre.model.reference is None  # one model in memory
    live_loss, pre_loss = losses_of(live), losses_of(pre)
    assert len(live_loss) == 8 and live_loss[0] == pytest.approx(0.6931, abs=1e-4)  # policy == reference at step 0
    assert live_loss[-1] < live_loss[0]
    assert pre_loss == pytest.approx(live_loss, abs=1e-5)
    for (name, a), b in zip(live.model.policy.named_parameters(), pre.model.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_reference_is_frozen_unoptimised_and_not_saved(tmp_path, tiny_model_dir, scored_pairs):
    cli = main(args(tmp_path, tiny_model_dir, "DPO", scored_pairs, "--trainer.max_steps", "4",
                    "--trainer.enable_checkpointing", "true",
                    "--trainer.callbacks+=drdo_lightning.ExportHuggingFace"))
    module = cli.model
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name, param in module.reference.lm.named_parameters():
        assert not param.requires_grad and param.grad is None
        torch.testing.assert_close(param, initial[name], msg=name)
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    assert optimised == {id(p) for p in module.policy.parameters()}
    # The policy moved away from the reference.
    assert any(not torch.equal(p, initial[n]) for n, p in module.policy.lm.named_parameters())

    (ckpt,) = (tmp_path / "lightning_logs").rglob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and not [k for k in state if k.startswith("reference.")]
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert set(exported) == set(initial)
    assert not (tmp_path / "export" / "reward_head.safetensors").exists()

    # A checkpoint without the reference restores: the reference is rebuilt from disk.
    resumed = main(args(tmp_path / "resume", tiny_model_dir, "DPO", scored_pairs, "--trainer.max_steps", "6",
                        "--ckpt_path", str(ckpt)))
    assert resumed.trainer.global_step == 6


def test_precomputed_reference_is_cached_and_keyed_by_truncation(tmp_path, tiny_model_dir, scored_pairs, monkeypatch):
    common = ("--trainer.max_steps", "1", "--model.precompute_reference", "true")
    main(args(tmp_path, tiny_model_dir, "DPO", scored_pairs, *common))
    caches = list((tmp_path / "cache").rglob("reference-*.pt"))
    assert len(caches) == 1

    def fail(*_):
        raise AssertionError("reference log-probs recomputed despite the cache")

    monkeypatch.setattr(reference, "compute", fail)
    main(args(tmp_path, tiny_model_dir, "DPO", scored_pairs, *common))  # cache hit
    with pytest.raises(AssertionError, match="recomputed"):
        main(args(tmp_path, tiny_model_dir, "DPO", scored_pairs, *common, "--data.max_prompt_length", "16", "--data.max_length", "40"))


def test_separate_reference_path_is_used(tmp_path, tiny_model_dir, scored_pairs):
    other = tmp_path / "other"
    model = CausalLMWithRewardHead.from_pretrained(tiny_model_dir, reward_head=False)
    with torch.no_grad():
        for p in model.lm.parameters():
            p.mul_(0.5)
    model.lm.save_pretrained(other)
    cli = main(args(tmp_path, tiny_model_dir, "DPO", scored_pairs, "--trainer.max_steps", "1",
                    "--model.reference_model", str(other)))
    ref_params = dict(cli.model.reference.lm.named_parameters())
    for name, p in model.lm.named_parameters():
        torch.testing.assert_close(ref_params[name], p)
    # Policy and reference differ, so the first DPO loss is not log 2.
    assert losses_of(cli)[0] != pytest.approx(0.6931, abs=1e-3)


@pytest.mark.parametrize(
    "objective, extra",
    [
        ("IPO", ()),
        ("Distill", ("--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected")),
        ("EDPO", ("--data.chosen_score_column", "ensemble_chosen", "--data.rejected_score_column", "ensemble_rejected")),
    ],
)
def test_each_baseline_trains(tmp_path, tiny_model_dir, scored_pairs, objective, extra):
    cli = main(args(tmp_path, tiny_model_dir, objective, scored_pairs, "--trainer.max_steps", "12",
                    "--data.batch_size", "16", *extra))
    loss = losses_of(cli)
    assert len(loss) == 12 and torch.tensor(loss).isfinite().all()
    assert loss[-1] < loss[0]
    metrics = cli.trainer.callback_metrics
    assert {"train/reward_accuracy", "train/reward_margin", "train/implicit_accuracy"} <= set(metrics)


def test_score_shape_mismatches_are_explained_when_the_data_loads(tmp_path, tiny_model_dir, scored_pairs, monkeypatch,
                                                                  capsys):
    from drdo_lightning.objectives.base import PreferenceModule

    monkeypatch.setattr(PreferenceModule, "training_step", lambda *a: pytest.fail("a step ran"))
    cases = [("EDPO", "oracle", "(oracle_chosen, oracle_rejected) hold one number per response, and EDPO needs ensemble "
                                "scores")]
    cases += [(objective, "ensemble", f"(ensemble_chosen, ensemble_rejected) hold a list of 3 numbers per response, and "
                                      f"{objective} takes one Oracle score per response; use EDPO") for objective in ("Distill", "DRDO")]
    for objective, columns, message in cases:
        with pytest.raises(SystemExit):
            main(args(tmp_path, tiny_model_dir, objective, scored_pairs, "--trainer.max_steps", "1",
                      "--data.chosen_score_column", f"{columns}_chosen", "--data.rejected_score_column", f"{columns}_rejected"))
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["DRDO", "Distill", "EDPO"])
def test_distilling_without_score_columns_is_one_line_before_anything_loads(objective, tmp_path, tiny_model_dir,
                                                                           scored_pairs, capsys, monkeypatch):
    monkeypatch.setattr(PreferenceDataModule, "setup", lambda *a: pytest.fail("tokenized the data first"))
    with pytest.raises(SystemExit) as exit_info:
        main(args(tmp_path, tiny_model_dir, objective, scored_pairs, "--trainer.max_steps", "1"))
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {objective} distils Oracle rewards and the data has none: set --data.chosen_score_column")
    assert "`python -m drdo_lightning score`" in line


def test_ensemble_members_differ_only_in_the_reward_head_init(tmp_path, tiny_model_dir, scored_pairs):
    config = tmp_path / "rm.yaml"
    config.write_text(
        "model:\n  class_path: drdo_lightning.OracleRewardModel\n  init_args:\n"
        f"    model: {tiny_model_dir}\n    alpha: 0.0\n    learning_rate: 0.0\n"
        f"data:\n  train_file: {scored_pairs}\n  batch_size: 8\n  cache_dir: null\n"
        "trainer:\n  max_steps: 1\n  enable_progress_bar: false\n"
    )
    exports = train_ensemble(str(config), members=2, out=str(tmp_path / "ens"))
    heads = [load_file(e / "reward_head.safetensors") for e in exports]
    bodies = [load_file(e / "model.safetensors") for e in exports]
    assert not torch.equal(heads[0]["weight"], heads[1]["weight"])
    for name in bodies[0]:  # lr 0: the backbone stays the shared starting point
        torch.testing.assert_close(bodies[0][name], bodies[1][name])
    again = train_ensemble(str(config), members=1, out=str(tmp_path / "again"))
    torch.testing.assert_close(load_file(again[0] / "reward_head.safetensors")["weight"], heads[0]["weight"])


def test_summary_table_shows_the_final_validation_metrics(tmp_path):
    runs = {name: FitResult(tmp_path / name, None, None, None, 20,
                            {"train/loss": 1.0, "val/loss": 1.5, "val/implicit_accuracy": acc})
            for name, acc in (("drdo", 0.7), ("dpo", 0.6))}
    table = write_summary(runs, tmp_path)
    assert "| drdo | 1.500 | 0.700 |" in table and "| dpo | 1.500 | 0.600 |" in table
    assert (tmp_path / "summary.csv").read_text().splitlines()[1].startswith("drdo,1.5,0.7")


def test_ipo_averages_token_logps_by_default_as_trl_does_and_sums_on_request(tiny_model_dir, padded_responses):
    torch.manual_seed(0)
    ids, mask, labels = padded_responses("right")
    batch = {f"{side}_{key}": value for side in ("chosen", "rejected")
             for key, value in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}
    lengths = (labels != -100).sum(-1).float()

    def chosen_logps(module):
        module.configure_model()
        with torch.no_grad():
            return module.forward_pairs(batch).chosen_logps

    summed = chosen_logps(IPO(str(tiny_model_dir), average_logps=False))
    torch.testing.assert_close(chosen_logps(IPO(str(tiny_model_dir))), summed / lengths)
    torch.testing.assert_close(chosen_logps(DPO(str(tiny_model_dir))), summed)


ROOT = Path(__file__).resolve().parents[1]
NEW_RECIPES = {"cdpo": "CDPO", "rdpo": "RDPO", "rpo": "RPO", "simpo": "SimPO", "orpo": "ORPO"}


@pytest.mark.parametrize("recipe", sorted(NEW_RECIPES))
def test_new_baseline_recipes_train_two_steps_on_the_embedded_default(recipe, tmp_path):
    """Each shipped recipe, shortened: the reference-free ones hold the policy alone (no reference, no reward head)."""
    extra = ["--model.precompute_reference", "true"] if recipe == "rdpo" else []
    cli = main(["fit", "--config", str(ROOT / "configs" / f"{recipe}.yaml"), "--trainer.max_steps", "2",
                "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                "--data.cache_dir", str(tmp_path / "cache"), *extra])
    module = cli.model
    assert type(module).__name__ == NEW_RECIPES[recipe] and cli.trainer.global_step == 2
    loss = losses_of(cli)
    assert len(loss) == 2 and torch.tensor(loss).isfinite().all()
    assert module.policy.reward_head is None
    if recipe in ("simpo", "orpo") or recipe == "rdpo":  # rdpo here with its reference precomputed
        assert getattr(module, "reference", None) is None
        assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.policy.lm.parameters())
    metrics = cli.trainer.callback_metrics
    assert {"train/reward_accuracy", "train/reward_margin", "val/loss"} <= set(metrics)
    assert ("train/nll" in metrics) == (recipe in ("rpo", "orpo"))


def objective_loss(module, batch):
    module.configure_model()
    with torch.no_grad():
        return module.loss_and_outputs(batch, "val")[0]


@pytest.fixture(scope="module")
def batch_with_reference(tiny_model_dir, scored_pairs):
    from drdo_lightning import PreferenceDataModule
    from drdo_lightning.data.collation import PairCollator

    dm = PreferenceDataModule(train_file=str(scored_pairs), tokenizer=str(tiny_model_dir), cache_dir=None)
    dm.setup("fit")
    batch = PairCollator(dm.tokenizer.pad_token_id)([dm.train_dataset[i] for i in range(8)])
    generator = torch.Generator().manual_seed(0)
    return {**batch, "ref_chosen_logps": -30 - 10 * torch.rand(8, generator=generator),
            "ref_rejected_logps": -30 - 10 * torch.rand(8, generator=generator)}


def test_dpo_variants_reduce_to_dpo_at_their_limits(tiny_model_dir, batch_with_reference):
    from drdo_lightning import CDPO, RDPO, RPO

    model = str(tiny_model_dir)
    dpo = objective_loss(DPO(model, beta=0.3), batch_with_reference)
    for limit in (CDPO(model, beta=0.3, label_smoothing=0.0), RDPO(model, beta=0.3, flip_rate=0.0),
                  RPO(model, beta=0.3, nll_weight=0.0)):
        assert objective_loss(limit, batch_with_reference) == dpo, type(limit).__name__
    assert objective_loss(CDPO(model, beta=0.3, label_smoothing=0.2), batch_with_reference) != dpo
    # RPO adds the chosen responses' mean token NLL, the SFT recipe's loss.
    from drdo_lightning import SFT

    nll = objective_loss(SFT(model, average_logps=True, disable_dropout=True), batch_with_reference)
    torch.testing.assert_close(objective_loss(RPO(model, beta=0.3, nll_weight=0.5), batch_with_reference), dpo + 0.5 * nll)
    with pytest.raises(ValueError, match="flip_rate"):
        RDPO(model, flip_rate=0.5)


def test_soft_label_distillation_trains_drdo_and_is_checked(tmp_path, tiny_model_dir, scored_pairs):
    from drdo_lightning import DRDO

    cli = main(args(tmp_path, tiny_model_dir, "DRDO", scored_pairs, "--trainer.max_steps", "6", "--data.batch_size", "16",
                    "--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected",
                    "--model.distill_form", "bt_soft"))
    assert cli.model.hparams.distill_form == "bt_soft" and torch.tensor(losses_of(cli)).isfinite().all()
    with pytest.raises(ValueError, match="distill_form"):
        DRDO(str(tiny_model_dir), distill_form="kl")


@pytest.mark.parametrize("method", ["cdpo", "rdpo", "rpo", "simpo", "orpo"])
def test_compare_tunes_each_new_method_over_a_real_option_of_its_objective(method):
    """configs/compare.yaml tunes the new recipes too: each grid key is an argument of the
    objective the recipe trains, so no tuning run fails on (or silently ignores) a misspelt knob."""
    import inspect

    import yaml

    from drdo_lightning.experiments.tuning import settings_of
    from drdo_lightning.recipes import config_path, recipe_objective

    objective = recipe_objective(method)
    accepted = {name for cls in objective.__mro__ if "__init__" in vars(cls)
                for name in inspect.signature(cls.__init__).parameters}
    grid = yaml.safe_load(config_path("compare").read_text())["grid"][method]
    assert {key.removeprefix("model.") for key in grid} <= accepted
    settings = settings_of(grid, [1e-4, 1e-3])
    assert len(settings) == 2 * len(next(iter(grid.values())))
