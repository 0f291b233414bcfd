"""The objectives beyond DRDO under each sharding strategy: 2 processes train as one.

``test_deepspeed.py`` and ``test_fsdp.py`` prove the strategies (resume, validate, export,
sharding at creation) on DRDO. Here the same comparison (2 ranks x 4 pairs against one process
with each global batch of 8, per-step loss within ``LOSS_RTOL``, why that is exact is explained
in ``test_deepspeed.py``) runs on objectives whose losses take other paths through the code:

- SimPO: no reference, length-normalised log-probs, a target margin;
- RPO with ``precompute_reference``: reference log-probs computed once on rank 0, cached beside
  the data and read by both ranks after a barrier, plus the chosen NLL term;
- ORPO: no reference, log-odds of mean log-probs plus the NLL, under FSDP;
- DRDO with ``group_by_length``: batches of similar lengths, grouped before the split across processes;
- DRDO under ZeRO-3 and DPO under FSDP with the chunked LM head and packed batches
  (``--model.chunked_head true --model.pack_sequences true``), DRDO with length groups too.

The pairs are of families, not of every objective: CDPO/RDPO change DPO's per-pair loss only
(``DPO.pair_loss``), which the single-process tests pin down.
"""

from __future__ import annotations

import pytest
from test_deepspeed import assert_same_losses, assert_trained_alike, cli, run, strategy_args, training_pairs
from test_export import fit_args, logged

from drdo_lightning import CausalLMWithRewardHead
from drdo_lightning.cli import main

PACKED = ["--model.chunked_head", "true", "--model.pack_sequences", "true"]
CASES = [
    pytest.param("SimPO", "deepspeed_zero2", [], id="simpo-zero2"),
    pytest.param("RPO", "deepspeed_zero3", ["--model.precompute_reference", "true"], id="rpo-precomputed-zero3"),
    pytest.param("ORPO", "fsdp", [], id="orpo-fsdp"),
    # Length groups are built before the split across processes (data.sampling.ResumableSampler).
    pytest.param("DRDO", "deepspeed_zero2", ["--data.group_by_length", "true"], id="drdo-grouped-zero2"),
    # The chunked LM head calls the head module outside the model's forward and again in backward:
    # ZeRO-3 gathers its partitioned weight at each call, FSDP's root unit holds it unsharded. Packed
    # batches (each rank packs its own) and length groups built before the split ride along.
    pytest.param("DRDO", "deepspeed_zero3", [*PACKED, "--data.group_by_length", "true"], id="drdo-chunked-packed-grouped-zero3"),
    pytest.param("DPO", "fsdp", PACKED, id="dpo-chunked-packed-fsdp"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "preset", "extra"), CASES)
def test_two_processes_train_as_one(objective, preset, extra, tmp_path, tiny_model_dir, pairs16):
    single = main(fit_args(tmp_path / "single", tiny_model_dir, pairs16, *extra, objective=objective))
    want = logged(tmp_path / "single", "train/loss")

    sharded = tmp_path / "sharded"
    args = strategy_args(sharded, tiny_model_dir, pairs16, preset, *extra,
                         "--trainer.callbacks+=drdo_lightning.ExportHuggingFace", objective=objective)
    sharded.mkdir()
    run(cli(*args), sharded)
    assert_same_losses(logged(sharded, "probe/loss"), want)

    reference = single.model.policy.eval()
    exported = CausalLMWithRewardHead.from_pretrained(sharded / "export", reward_head=reference.reward_head is not None)
    assert_trained_alike(exported.eval(), reference, training_pairs(single.datamodule))
