"""The scale of the Oracle margins a distilling student regresses onto, and DRDO's two readings of the
student's reward: measured on hand-made data, against hand-computed losses, through `fit` and `export`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from test_baselines import args, losses_of, scored_pairs  # noqa: F401 (a fixture)

from drdo_lightning import DRDO, EDPO, Distill, PreferenceDataModule, losses
from drdo_lightning.cli import main
from drdo_lightning.errors import DataError
from drdo_lightning.export import TRAINING_TARGET_FILE, export
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.objectives import PairOutputs
from drdo_lightning.objectives.oracle_target import OracleTarget

ROOT = Path(__file__).resolve().parents[1]

ORACLE = ("--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected")
ENSEMBLE = ("--data.chosen_score_column", "ensemble_chosen", "--data.rejected_score_column", "ensemble_rejected")

# Oracle scores by hand: margins 3, -1, 0.5, 2.5 (one Oracle); two ensemble members with margins
# (1, 10), (3, 30), (2, 20), (0, 0).
HAND_ROWS = [
    {"prompt": f"prompt {i}", "chosen": f" good answer {i}", "rejected": f" bad answer {i}",
     "score_w": w, "score_l": l, "members_w": mw, "members_l": ml}
    for i, (w, l, mw, ml) in enumerate([(4.0, 1.0, [1.0, 10.0], [0.0, 0.0]), (0.0, 1.0, [3.0, 40.0], [0.0, 10.0]),
                                        (1.5, 1.0, [2.0, 20.0], [0.0, 0.0]), (2.5, 0.0, [0.0, 5.0], [0.0, 5.0])])
]


@pytest.fixture
def hand_data(tmp_path, tiny_model_dir):
    def data(chosen: str, rejected: str, rows: list[dict] = HAND_ROWS) -> PreferenceDataModule:
        path = write_jsonl(tmp_path / "hand.jsonl", rows)
        dm = PreferenceDataModule(train_file=str(path), tokenizer=str(tiny_model_dir), cache_dir=None,
                                  chosen_score_column=chosen, rejected_score_column=rejected)
        dm.setup("fit")
        return dm

    return data


def test_the_normalisation_is_the_margins_standard_deviation_over_the_training_pairs(hand_data):
    target = OracleTarget(scale=2.0, normalization="std")
    target.fit_to(hand_data("score_w", "score_l"))
    want = statistics.stdev([3.0, -1.0, 0.5, 2.5])
    assert target.std.item() == pytest.approx(want, rel=1e-6)
    assert target.multiplier.item() == pytest.approx(2.0 / want, rel=1e-6)
    batch = {"chosen_score": torch.tensor([4.0, 0.0]), "rejected_score": torch.tensor([1.0, 1.0])}
    scaled = target.scaled(batch)
    torch.testing.assert_close(scaled["chosen_score"] - scaled["rejected_score"], torch.tensor([3.0, -1.0]) * 2.0 / want)
    assert target.record() == {"target_scale": 2.0, "target_normalization": "std",
                               "target_multiplier": pytest.approx(2.0 / want), "oracle_margin_std": pytest.approx(want)}


def test_an_ensemble_is_normalised_per_member(hand_data):
    target = OracleTarget(normalization="std")
    target.fit_to(hand_data("members_w", "members_l"))
    want = [statistics.stdev([1.0, 3.0, 2.0, 0.0]), statistics.stdev([10.0, 30.0, 20.0, 0.0])]
    torch.testing.assert_close(target.std, torch.tensor(want))
    scaled = target.scaled({"chosen_score": torch.tensor([[1.0, 10.0]]), "rejected_score": torch.tensor([[0.0, 0.0]])})
    torch.testing.assert_close(scaled["chosen_score"], torch.tensor([[1.0 / want[0], 10.0 / want[1]]]))


def test_a_fixed_factor_needs_no_data_and_margins_that_do_not_vary_are_refused(hand_data):
    target = OracleTarget(scale=3.0)
    target.fit_to(None)  # nothing to measure
    assert target.multiplier.item() == 3.0 and target.record()["target_multiplier"] == 3.0
    flat = [dict(r, score_w=1.0, score_l=0.0) for r in HAND_ROWS]
    with pytest.raises(DataError, match="do not vary"):
        OracleTarget(normalization="std").fit_to(hand_data("score_w", "score_l", flat))
    with pytest.raises(ValueError, match="target_normalization"):
        OracleTarget(normalization="minmax")


def outputs(**fields) -> PairOutputs:
    return PairOutputs(chosen_logps=torch.tensor([-4.0, -10.0]), rejected_logps=torch.tensor([-6.0, -9.0]),
                       chosen_rewards=None, rejected_rewards=None, chosen_lengths=torch.tensor([2, 5]), **fields)


def test_drdo_with_the_policy_logps_as_its_reward_against_a_hand_computed_loss():
    """r̂ = s z: distillation (Δr* - s (z_w - z_l))^2 plus Eq. 6's preference term, nothing from a head."""
    module = DRDO("unused", student_reward="logps", logps_reward_scale=0.5, alpha=0.1, gamma=2.0)
    assert not module.needs.reward_head
    batch = {"chosen_score": torch.tensor([1.0, 0.0]), "rejected_score": torch.tensor([0.0, 2.0])}
    got = module.pair_loss(batch, outputs()).loss
    want = []
    for zw, zl, oracle in ((-4.0, -6.0, 1.0), (-10.0, -9.0, -2.0)):
        distillation = (oracle - 0.5 * (zw - zl)) ** 2
        p_w = 1 / (1 + torch.exp(torch.tensor(zl - zw)))
        preference = -0.1 * (1 - p_w) ** 2 * (zw - torch.log1p(-torch.exp(torch.tensor(zl))))
        want.append(distillation + preference.item())
    torch.testing.assert_close(got, torch.tensor(want))
    # The same as the reward-head reading handed r̂ = s z.
    head = DRDO("unused").pair_loss(batch, outputs()._replace(chosen_rewards=torch.tensor([-2.0, -5.0]),
                                                               rejected_rewards=torch.tensor([-3.0, -4.5])))
    torch.testing.assert_close(got, head.loss)


def test_distill_and_edpo_regress_onto_the_scaled_target():
    out = outputs()
    ref = {"ref_chosen_logps": torch.tensor([-5.0, -9.0]), "ref_rejected_logps": torch.tensor([-5.0, -9.5])}
    batch = {"chosen_score": torch.tensor([1.0, 0.0]), "rejected_score": torch.tensor([0.0, 2.0]), **ref}
    module = Distill("unused", target_scale=4.0)
    got = module.pair_loss(module.oracle_target.scaled(batch), out).loss
    want = losses.distill_loss(out.chosen_logps, out.rejected_logps, ref["ref_chosen_logps"], ref["ref_rejected_logps"],
                               4.0 * batch["chosen_score"], 4.0 * batch["rejected_score"], beta=0.1)
    torch.testing.assert_close(got, want)
    ensemble = {**ref, "chosen_score": torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "rejected_score": torch.zeros(2, 2)}
    edpo = EDPO("unused", target_scale=0.5)
    loss, _ = edpo.batch_loss(edpo.oracle_target.scaled(ensemble), out, "val")
    want = losses.edpo_loss(out.chosen_logps, out.rejected_logps, ref["ref_chosen_logps"], ref["ref_rejected_logps"],
                            0.5 * ensemble["chosen_score"], ensemble["rejected_score"], beta=0.1)
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("reading", ["reward_head", "logps"])
def test_a_drdo_run_with_and_without_a_head_trains_records_its_target_and_exports(tmp_path, tiny_model_dir, scored_pairs,
                                                                                   reading):
    root = tmp_path / reading
    cli = main(args(root, tiny_model_dir, "DRDO", scored_pairs, *ORACLE, "--trainer.max_steps", "2",
                    "--trainer.enable_checkpointing", "true", "--model.student_reward", reading,
                    "--model.target_normalization", "std",
                    "--trainer.callbacks+=drdo_lightning.ExportHuggingFace",
                    "--trainer.callbacks.dirpath", str(root / "export")))
    module = cli.model
    assert (module.policy.reward_head is None) == (reading == "logps")
    assert torch.tensor(losses_of(cli)).isfinite().all()
    rows = [json.loads(line) for line in scored_pairs.read_text().splitlines()]
    margins = [r["oracle_chosen"] - r["oracle_rejected"] for r in rows]
    trained_on = module.oracle_target.std.item()
    assert trained_on == pytest.approx(statistics.stdev(margins), rel=1e-5)  # every pair of the file trains
    record = json.loads((root / "export" / TRAINING_TARGET_FILE).read_text())
    assert record["student_reward"] == reading and record["oracle_margin_std"] == pytest.approx(trained_on)
    assert (root / "export" / "reward_head.safetensors").exists() == (reading == "reward_head")
    metrics = cli.trainer.callback_metrics
    assert {"train/reward_accuracy", "train/distillation", "train/reward_corr"} <= set(metrics)

    # The checkpoint keeps the target: a resumed run regresses onto the same one, and `export` writes it.
    (checkpoint,) = (root / "lightning_logs").rglob("*.ckpt")
    assert torch.load(checkpoint, weights_only=True)["training_target"]["oracle_margin_std"] == pytest.approx(trained_on)
    exported = export(str(checkpoint), str(tmp_path / f"{reading}-from-checkpoint"))
    assert json.loads((exported / TRAINING_TARGET_FILE).read_text()) == record


def test_the_tuned_drdo_recipe_distils_a_soft_label_into_the_policys_log_probs(tmp_path):
    """configs/drdo_logps.yaml, shortened: the frontier's tuned DRDO on the shipped data, no reward head."""
    cli = main(["fit", "--config", str(ROOT / "configs" / "drdo_logps.yaml"), "--trainer.max_steps", "2",
                "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                "--data.cache_dir", str(tmp_path / "cache")])
    module = cli.model
    assert (module.hparams.student_reward, module.hparams.distill_form, module.hparams.alpha) == ("logps", "bt_soft", 0.03)
    assert module.policy.reward_head is None and cli.trainer.global_step == 2
    assert torch.tensor(losses_of(cli)).isfinite().all()
    assert {"train/distillation", "train/reward_corr", "val/loss"} <= set(cli.trainer.callback_metrics)
