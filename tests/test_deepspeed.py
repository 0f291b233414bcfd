"""DeepSpeed ZeRO-2/3 on CPU with several processes: the same training as one process, sharded.

Every multi-process run is the real command line (``python -m drdo_lightning fit`` or
``torchrun``) with a preset from ``configs/strategies/``. Each is compared step by step with
one in-process, single-process run of the same global batch (8 pairs): 2 ranks x 4 pairs.

Why the comparison is exact: the data module shuffles with a seeded ``DistributedSampler``
(one permutation per epoch from ``seed_everything``) that gives rank r the items r, r+2, ...;
the two ranks' batches at a step together are the single process's batch at that step. The
modules log rank 0's loss only, so the runs here also log ``probe/loss``, the mean over ranks,
which is the loss of the global batch (each loss is a mean over pairs). DeepSpeed averages the
gradients over ranks, so the updates are the single process's too.

Tolerance: ``LOSS_RTOL`` = 1e-4 relative per step. Measured differences are at most 1.5e-7
(float32 sums in another order: per-rank forwards, all-reduce, partitioned clipping norms).
A real fault (a rank with the wrong shard, no gradient averaging, lost optimizer state on
resume, the schedule one step off) moves the loss by more than 1e-2 within a few steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import progress
import pytest
import torch
from test_export import STEPS, STOP, fit_args, logged

from drdo_lightning import CausalLMWithRewardHead, logprobs
from drdo_lightning.cli import main
from drdo_lightning.data.collation import PairCollator
from drdo_lightning.export import policy_from_state_dict, read_checkpoint
from drdo_lightning.strategies.deepspeed import OPS, build_ops, extensions_dir, leftover_build_locks

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "strategies").glob("deepspeed_*.yaml"))
LOSS_RTOL = 1e-4


def strategy_args(root: Path, model_dir: Path, train: Path, preset: str, *extra: str, objective: str = "DRDO") -> list[str]:
    """``fit_args`` on 2 CPU processes with 4 pairs each, a strategy preset and the loss probe."""
    return [
        *fit_args(root, model_dir, train, objective=objective),
        "--config", str(ROOT / "configs" / "strategies" / f"{preset}.yaml"),
        "--trainer.devices", "2",
        "--data.batch_size", "4",
        "--trainer.callbacks+=probes.MeanLossOverRanks",
        *extra,
    ]


def subprocess_env() -> dict[str, str]:
    # tests/ on the path for `probes`; one thread per rank, since the ranks share the cores.
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run(command: list[str], cwd: Path) -> None:
    """Run ``command`` to its end, however slow the machine (a hang, no progress at all, fails: :mod:`progress`)."""
    done = progress.run(command, cwd=cwd, env=subprocess_env())
    assert done.returncode == 0, f"{command[:6]} failed:\n{(done.stdout + done.stderr)[-4000:]}"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "drdo_lightning", *args]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_model_dir, pairs16):
    """The reference: one process, batches of 8, 8 steps; its per-step loss and final policy."""
    root = tmp_path_factory.mktemp("single_process")
    ran = main(fit_args(root, tiny_model_dir, pairs16))
    return logged(root, "train/loss"), ran.model.policy.eval(), ran.datamodule


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    assert got == pytest.approx(want, rel=LOSS_RTOL)


def training_pairs(datamodule) -> list[torch.Tensor]:
    """The 16 training pairs as ``[ids, mask, labels]`` of the chosen, then of the rejected responses."""
    batch = PairCollator(datamodule.tokenizer.pad_token_id)([datamodule.train_dataset[i] for i in range(16)])
    return [batch[f"{side}_{key}"] for side in ("chosen", "rejected") for key in ("input_ids", "attention_mask", "labels")]


def sequence_outputs(model: CausalLMWithRewardHead, pairs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response log-probs of chosen and rejected, and the reward margins r̂_w - r̂_l (None without a reward head)."""
    chosen_ids, chosen_mask, chosen_labels, rejected_ids, rejected_mask, rejected_labels = pairs
    with torch.no_grad():
        chosen, rejected = model(chosen_ids, chosen_mask), model(rejected_ids, rejected_mask)
    logps = torch.cat([logprobs.sequence_logps(chosen.logits, chosen_labels), logprobs.sequence_logps(rejected.logits, rejected_labels)])
    return logps, None if chosen.rewards is None else chosen.rewards - rejected.rewards


def test_the_ops_deepspeed_needs_here_build_ahead_of_any_run():
    # On CPU both exist (torch's extension cache makes a second build a load).
    assert build_ops() == list(OPS)


def test_a_killed_builds_lock_is_found_where_torch_builds(tmp_path, monkeypatch):
    # torch waits forever on a lock a killed build left; setup must be able to name it.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_dir() == tmp_path
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").touch()
    assert leftover_build_locks(tmp_path) == []
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    assert leftover_build_locks(tmp_path) == [tmp_path / "deepspeed_shm_comm" / "lock"]
    assert leftover_build_locks(tmp_path / "absent") == []


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_strategy_presets_compose_with_a_recipe(preset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/drdo.yaml"), "--config", str(preset), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: drdo_lightning.strategies.DeepSpeedStrategy" in printed
    assert f"stage: {3 if 'zero3' in preset.stem else 2}" in printed
    assert ("offload_optimizer: true" in printed) == ("offload" in preset.stem)
    assert "class_path: drdo_lightning.DRDO" in printed  # the recipe is intact


@pytest.mark.slow
def test_zero2_two_processes_match_one_resume_from_last_and_validate(tmp_path, tiny_model_dir, pairs16, single_process):
    want, _, _ = single_process
    args = strategy_args(tmp_path, tiny_model_dir, pairs16, "deepspeed_zero2", "--data.val_file", str(pairs16))
    run(cli(*args, "--trainer.callbacks+=probes.StopAfterSteps", "--trainer.callbacks.steps", str(STOP)), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert (last / "checkpoint").is_dir()  # DeepSpeed's sharded layout, not a file
    run(cli(*args, "--ckpt_path", "last"), tmp_path)

    before, after = logged(tmp_path, "probe/loss", 0), logged(tmp_path, "probe/loss", 1)
    assert max(before) == STOP - 1 and min(after) == STOP  # resumed at the step where it stopped
    # Steps after the resume match too: same weights, same Adam moments, same schedule.
    assert_same_losses({**before, **after}, want)
    _, rest = read_checkpoint(last)
    assert rest["global_step"] == STEPS

    # `validate` from the sharded checkpoint (DeepSpeed's inference engine) on 2 processes
    # reproduces the validation loss that fit logged after its last step.
    fit_val_loss = logged(tmp_path, "val/loss", 1)[STEPS - 1]
    run(cli("validate", *args[1:], "--ckpt_path", "last"), tmp_path)
    assert logged(tmp_path, "val/loss", 2) == {0: pytest.approx(fit_val_loss, rel=1e-6)}


@pytest.mark.slow
def test_zero3_shards_the_model_at_creation_matches_one_process_and_exports(tmp_path, tiny_model_dir, pairs16, single_process):
    want, reference, datamodule = single_process
    probe_dir = tmp_path / "shards"
    args = strategy_args(
        tmp_path, tiny_model_dir, pairs16, "deepspeed_zero3",
        "--model", "probes.ShardProbeDRDO", "--model.probe_dir", str(probe_dir),
        "--trainer.callbacks+=drdo_lightning.ExportHuggingFace",
    )
    run(cli(*args), tmp_path)
    assert_same_losses(logged(tmp_path, "probe/loss"), want)

    # Right after configure_model every parameter, the reward head's too, is a ZeRO-3 partition:
    # the tensor the module sees is empty, each rank holds half (padded up) of its elements.
    shards = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {"reward_head.weight", "reward_head.bias"} <= set(shards[0])
    for name, (full, local, seen) in shards[0].items():
        assert seen == 0 and local == -(-full // 2) == shards[1][name][1], name

    # The callback's export (gathered at fit end) holds the consolidated checkpoint's weights.
    weights, _ = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    consolidated = policy_from_state_dict(reference.lm.config, weights)
    exported = CausalLMWithRewardHead.from_pretrained(tmp_path / "export").eval()
    pairs = training_pairs(datamodule)
    for got, expected in zip(sequence_outputs(exported, pairs), sequence_outputs(consolidated, pairs)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    assert_trained_alike(exported, reference, pairs)


def assert_trained_alike(got: CausalLMWithRewardHead, want: CausalLMWithRewardHead, pairs: list[torch.Tensor]) -> None:
    """``got`` computes ``want``'s log-probs and reward margins on ``pairs``, as sharded training should.

    Margins, not rewards: the reward head's bias is left out, the loss depends on reward
    differences only, its gradient is zero up to rounding, which Adam scales up to
    learning-rate-sized steps in whichever direction rounding points.
    """
    logps, margins = sequence_outputs(got, pairs)
    want_logps, want_margins = sequence_outputs(want, pairs)
    torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-3)
    assert (margins is None) == (want_margins is None)
    if want_margins is not None:
        torch.testing.assert_close(margins, want_margins, rtol=1e-3, atol=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_torchrun_train_zero3_offload(tmp_path, tiny_model_dir, pairs16, single_process):
    """2 "nodes" x 1 process on localhost through launch/torchrun_drdo.sh, rendezvous on 127.0.0.1."""
    want, _, _ = single_process
    _, *args = strategy_args(tmp_path, tiny_model_dir, pairs16, "deepspeed_zero3_offload",
                       "--trainer.callbacks+=probes.StopAfterSteps", "--trainer.callbacks.steps", str(STOP))
    launcher = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "PYTHON": sys.executable}
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [
        subprocess.Popen(
            ["bash", str(ROOT / "launch" / "torchrun_drdo.sh"), *args],
            cwd=tmp_path, env={**subprocess_env(), **launcher, "NODE_RANK": str(rank)},
            stdout=log.open("w"), stderr=subprocess.STDOUT,
        )
        for rank, log in enumerate(logs)
    ]
    try:
        progress.wait(nodes, logs)
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log.read_text()[-4000:]
    # 2 nodes, DeepSpeedCPUAdam on offloaded states: the single process's first steps.
    assert_same_losses(logged(tmp_path, "probe/loss"), {s: v for s, v in want.items() if s < STOP})
    _, rest = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert rest["global_step"] == STOP
