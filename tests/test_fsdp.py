"""FSDP on CPU with several processes: the same training as one process, sharded.

The FSDP counterpart of ``test_deepspeed.py``, with its comparison (2 ranks x 4 pairs against one
process with the 8 pairs of each global batch, per-step loss within ``LOSS_RTOL``; why that is
exact is explained there). FSDP averages the gradients over ranks and clips by their global norm.
"""

from __future__ import annotations

import pytest
import torch
from test_deepspeed import (  # noqa: F401 (single_process: a fixture)
    ROOT,
    assert_same_losses,
    assert_trained_alike,
    cli,
    run,
    sequence_outputs,
    single_process,
    strategy_args,
    training_pairs,
)
from test_export import STEPS, STOP, logged

from drdo_lightning import CausalLMWithRewardHead
from drdo_lightning.cli import main
from drdo_lightning.export import read_checkpoint
from drdo_lightning.strategies.fsdp import is_sharded_checkpoint


def test_fsdp_preset_composes_with_a_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/drdo.yaml"), "--config", str(ROOT / "configs/strategies/fsdp.yaml"),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: drdo_lightning.strategies.FSDPStrategy" in printed and "state_dict_type: sharded" in printed
    assert "class_path: drdo_lightning.DRDO" in printed  # the recipe is intact


def test_fsdp_two_processes_match_one_across_a_resume_and_export(tmp_path, tiny_model_dir, pairs16, single_process):
    want, reference, datamodule = single_process
    args = strategy_args(tmp_path, tiny_model_dir, pairs16, "fsdp", "--trainer.callbacks+=drdo_lightning.ExportHuggingFace")
    run(cli(*args, "--trainer.callbacks+=probes.StopAfterSteps", "--trainer.callbacks.steps", str(STOP)), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(last)  # one file of shards per rank, not a whole-model file
    run(cli(*args, "--ckpt_path", "last"), tmp_path)

    before, after = logged(tmp_path, "probe/loss", 0), logged(tmp_path, "probe/loss", 1)
    assert max(before) == STOP - 1 and min(after) == STOP  # resumed at the step where it stopped
    assert_same_losses({**before, **after}, want)  # same weights, Adam moments and schedule after the resume

    # `export` of the sharded checkpoint writes what the callback gathered at the end of fit,
    # and that is what single-process training reaches.
    main(["export", "--checkpoint", str(last), "--output", str(tmp_path / "hf")])
    exported, gathered = (CausalLMWithRewardHead.from_pretrained(tmp_path / d).eval() for d in ("hf", "export"))
    pairs = training_pairs(datamodule)
    for got, expected in zip(sequence_outputs(exported, pairs), sequence_outputs(gathered, pairs), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert_trained_alike(exported, reference, pairs)
    _, rest = read_checkpoint(last)
    assert rest["global_step"] == STEPS


def test_fsdp_on_cpu_computes_in_the_precision_asked_for(tmp_path, tiny_model_dir, pairs16):
    """--trainer.precision reaches FSDP's plugin (no default of ours overrides it) and its autocast runs on the CPU."""
    probe = tmp_path / "dtype"
    args = strategy_args(tmp_path, tiny_model_dir, pairs16, "fsdp", "--trainer.precision", "bf16-mixed",
                         "--trainer.max_steps", "1", "--trainer.callbacks+=probes.OutputDtype",
                         "--trainer.callbacks.path", str(probe))
    run(cli(*args), tmp_path)
    assert [(tmp_path / f"dtype.rank{r}").read_text() for r in (0, 1)] == ["torch.bfloat16"] * 2
