"""Checkpoints that survive: resume continues exactly; ``export`` turns a checkpoint into a HF directory.

Single process, in-process CLI runs on the tiny model. The DeepSpeed (sharded) counterparts are
in ``test_deepspeed.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import fit_argv
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from drdo_lightning import CausalLMWithRewardHead, logprobs
from drdo_lightning.cli import main
from drdo_lightning.data.collation import PairCollator

STEPS = 8  # 16 pairs in batches of 8: 2 steps per epoch, 4 epochs
STOP = 4  # the interrupted run stops here, at an epoch boundary


def fit_args(root: Path, model_dir: Path, train: Path, *extra: str, objective: str = "DRDO") -> list[str]:
    """A fit of ``objective`` on the tiny model and ``train`` that logs every step to CSV and checkpoints ``last``."""
    return fit_argv(
        root, model_dir, train,
        "--model.learning_rate", "1e-2",  # large enough that every step visibly moves the loss
        "--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected",
        "--trainer.max_epochs", str(STEPS // 2), "--trainer.gradient_clip_val", "1.0",
        *extra, objective=objective, checkpoints=True,
    )


def logged(root: Path, key: str, version: int = 0) -> dict[int, float]:
    """``{step: value}`` of one metric from a run's CSV log."""
    with (root / "lightning_logs" / f"version_{version}" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, pairs16):
    """The reference run: 8 steps in one go, exported by the callback at the end."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cli = main(fit_args(root, tiny_model_dir, pairs16, "--trainer.callbacks+=drdo_lightning.ExportHuggingFace"))
    return cli, root


def test_resume_from_last_continues_with_the_same_step_and_optimizer_state(tmp_path, tiny_model_dir, pairs16, uninterrupted):
    reference, reference_root = uninterrupted
    # Stopped after 4 steps, like a job at its time limit; max_epochs and so the learning-rate
    # schedule are those of the uninterrupted run. The runs are bounded by max_epochs because
    # Lightning 2.6 resumes a max_steps-bounded run from an end-of-epoch checkpoint with the
    # following epoch's shuffle (sampler.set_epoch one ahead); weights and optimizer are exact.
    first = main(fit_args(tmp_path, tiny_model_dir, pairs16, "--trainer.callbacks+=probes.StopAfterSteps",
                          "--trainer.callbacks.steps", str(STOP)))
    assert first.trainer.global_step == STOP
    resumed = main(fit_args(tmp_path, tiny_model_dir, pairs16, "--ckpt_path", "last"))
    assert resumed.trainer.global_step == STEPS
    assert min(logged(tmp_path, "train/loss", version=1)) == STOP  # the resumed run's first step

    # The loss trajectory, the final weights and the optimizer state are the uninterrupted run's.
    trajectory = {**logged(tmp_path, "train/loss", version=0), **logged(tmp_path, "train/loss", version=1)}
    assert trajectory == pytest.approx(logged(reference_root, "train/loss"), rel=1e-6)
    torch.testing.assert_close(resumed.model.policy.state_dict(), reference.model.policy.state_dict())
    done, want = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (tmp_path, reference_root))
    assert done["global_step"] == want["global_step"] == STEPS
    torch.testing.assert_close(done["optimizer_states"][0]["state"], want["optimizer_states"][0]["state"])
    assert done["lr_schedulers"][0]["last_epoch"] == want["lr_schedulers"][0]["last_epoch"] == STEPS


def _outputs(model, batch):
    with torch.no_grad():
        out = model(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    return logprobs.sequence_logps(out.logits, batch["chosen_labels"]), out.rewards


def test_export_command_round_trips_a_lightning_checkpoint(tmp_path, uninterrupted):
    cli, root = uninterrupted
    out = tmp_path / "hf"
    main(["export", "--checkpoint", str(root / "checkpoints" / "last.ckpt"), "--output", str(out)])
    assert {"config.json", "model.safetensors", "reward_head.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    # The same files as the callback's export at the end of fit.
    for name in ("model.safetensors", "reward_head.safetensors"):
        torch.testing.assert_close(load_file(out / name), load_file(root / "export" / name), rtol=0, atol=0)

    # With the project: the trained module's log-probs and rewards.
    trained = cli.model.policy.eval()
    batch = PairCollator(cli.datamodule.tokenizer.pad_token_id)([cli.datamodule.train_dataset[i] for i in range(6)])
    exported = CausalLMWithRewardHead.from_pretrained(out).eval()
    for got, want in zip(_outputs(exported, batch), _outputs(trained, batch)):
        torch.testing.assert_close(got, want)

    # With transformers alone: the same logits, and it generates.
    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = batch["chosen_input_ids"][:1], batch["chosen_attention_mask"][:1]
    n = int(mask.sum())
    with torch.no_grad():
        torch.testing.assert_close(lm(ids[:, :n]).logits, trained.lm(ids[:, :n]).logits)
        generated = lm.generate(ids[:, :n], max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > n and torch.equal(generated[:, :n], ids[:, :n])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("a good movie")["input_ids"] == cli.datamodule.tokenizer("a good movie")["input_ids"]


def test_export_takes_the_model_and_tokenizer_from_the_command_line_when_the_checkpoint_cannot_say(
    tmp_path, tiny_model_dir, uninterrupted
):
    _, root = uninterrupted
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["hyper_parameters"]["model"], checkpoint["datamodule_hyper_parameters"]["tokenizer"]
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    with pytest.raises(ValueError, match="pass --model"):
        main(["export", "--checkpoint", str(moved), "--output", str(tmp_path / "hf")])
    main(["export", "--checkpoint", str(moved), "--output", str(tmp_path / "hf"),
          "--model", str(tiny_model_dir), "--tokenizer", str(tiny_model_dir)])
    torch.testing.assert_close(load_file(tmp_path / "hf" / "model.safetensors"), load_file(root / "export" / "model.safetensors"))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_export_rejects_a_checkpoint_without_policy_weights(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}, "hyper_parameters": {}}, path)
    with pytest.raises(ValueError, match="no 'policy"):
        main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "out")])
