"""Reliability and safety: bad input, interrupted runs, numerical faults, untrusted files.

Bad rows, missing files and the truncation rules are covered in test_data.py; this file adds
what only shows end to end through the CLI. Some tests start ``python -m drdo_lightning`` as a
subprocess (a config error, SIGKILL, SIGTERM); everything else runs in-process on tiny models.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import progress
import pytest
import torch
from conftest import fit_argv
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from drdo_lightning import SFT
from drdo_lightning.cli import main
from drdo_lightning.data.datamodule import PreferenceDataModule
from drdo_lightning.objectives import PairLoss
from drdo_lightning.reliability import AtomicCheckpointIO, CheckpointError, NonFiniteError, NonFiniteGuard, unreadable_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCORES = ["--data.chosen_score_column", "oracle_chosen", "--data.rejected_score_column", "oracle_rejected"]
# A short DRDO run whose checkpoint files the tests below read: a checkpoint every 5 steps, the
# last one at the final step (15) so that last.ckpt holds the final weights.
RESUME_STEPS, CADENCE = 15, 5
# The shipped recipes, shortened: a tiny model and the first 416 pairs of their training data, 13
# batches of 32 an epoch; everything else is theirs (a checkpoint every 50 steps and last.ckpt,
# validation twice an epoch, the tokenized-data cache). Killed after step 57, a run resumes from its
# checkpoint at step 50 (epoch 3, 11 batches in) and repeats steps 51-57 across the epoch boundary
# at step 52 and a validation.
RECIPE_PAIRS, RECIPE_EPOCHS, RECIPE_CADENCE, KILL_STEP = 416, 5, 50, 57


def fit_args(root: Path, model_dir: Path, train: Path, *extra: str, objective: str = "DRDO",
             checkpoints: bool | int = False, export: bool = False) -> list[str]:
    return fit_argv(root, model_dir, train, "--model.learning_rate", "1e-2", "--trainer.enable_model_summary", "false",
                    *extra, objective=objective, checkpoints=checkpoints, export=export)


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    """The command line in a child process; its output goes to ``proc.log`` (``cwd/run.log``)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))  # for `probes`
    log = cwd / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "drdo_lightning", *args], cwd=cwd,
                                env={**os.environ, "PYTHONPATH": path}, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finished_output(proc: subprocess.Popen) -> str:
    """What a :func:`start_cli` run printed, once it has exited: waited for while it makes progress."""
    progress.wait([proc], [proc.log])
    return proc.log.read_text()


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Wait while the run makes progress until ``path`` exists; fail with its output if it exits first."""
    progress.wait([proc], [proc.log], until=path.exists)
    if not path.exists():
        pytest.fail(f"the run exited ({proc.returncode}) before {path.name} appeared:\n{proc.log.read_text()}")


def resume_run_args(root: Path, tiny_model_dir: Path, pair_files) -> list[str]:
    return fit_args(root, tiny_model_dir, pair_files["train"], *SCORES, "--trainer.max_steps", str(RESUME_STEPS),
                    checkpoints=CADENCE, export=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, pair_files) -> Path:
    """An uninterrupted DRDO run with a checkpoint every CADENCE steps and an export."""
    root = tmp_path_factory.mktemp("reference")
    cli = main(resume_run_args(root, tiny_model_dir, pair_files))
    assert cli.trainer.global_step == RESUME_STEPS
    return root


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> dict[str, Path]:
    """The first RECIPE_PAIRS training pairs and one batch of validation pairs of the embedded default."""
    root = tmp_path_factory.mktemp("recipe_data")
    files = {}
    for split, rows in (("train", RECIPE_PAIRS), ("val", 32)):
        lines = (ROOT / "embedded_default" / "data" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(lines[:rows]))
    return files


def recipe_args(recipe: str, model_dir: Path, data: dict[str, Path], losses: Path, *extra: str) -> list[str]:
    """``fit`` with ``configs/<recipe>.yaml`` shortened, writing every step's loss to ``losses``.

    Run it from the run's own directory: the recipes write under ``runs/`` and cache under ``cache/``.
    """
    return [
        "fit", "--config", str(ROOT / "configs" / f"{recipe}.yaml"),
        "--model.model", str(model_dir),
        "--data.train_file", str(data["train"]),
        "--data.val_file", str(data["val"]),
        "--data.cache_dir", "cache",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=probes.StepLosses", "--trainer.callbacks.path", str(losses),
        *extra,
    ]


def step_losses(path: Path) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in (line.split() for line in path.read_text().splitlines())}


def assert_same_exports(run: Path, reference: Path) -> None:
    """Every tensor of the two Hugging Face exports is bitwise equal."""
    names = sorted(p.name for p in reference.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in run.glob("*.safetensors"))
    for name in names:
        got, want = load_file(run / name), load_file(reference / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_config_key_is_a_plain_error(tmp_path, tiny_model_dir, pair_files):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  class_path: drdo_lightning.SFT\n  init_args:\n    model: {tiny_model_dir}\n"
        f"data:\n  train_file: {pair_files['sft']}\n  rejected_column: null\n  batch_sise: 8\n"
    )
    proc = progress.run([sys.executable, "-m", "drdo_lightning", "fit", "--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: Subcommand 'fit' does not accept option 'data.batch_sise'" in proc.stderr
    assert "Traceback" not in proc.stderr and "args parameter" not in proc.stderr  # no noise around it


@pytest.mark.parametrize(
    "line,key,value",
    [("data:\n  batch_size: eight", "data.batch_size", "eight"), ("model:\n  init_args:\n    learning_rate: fast", "learning_rate", "fast")],
    ids=["data-int", "model-float"],
)
def test_wrong_type_in_config_names_key_and_value(line, key, value, tmp_path, tiny_model_dir, pair_files, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(f"model:\n  class_path: drdo_lightning.SFT\n  init_args:\n    model: {tiny_model_dir}\n"
                    f"data:\n  train_file: {pair_files['sft']}\n")
    override = tmp_path / "override.yaml"
    override.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(base), "--config", str(override)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'Parser key "{key}"' in err and f"Got value: {value}" in err


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_val_fraction_outside_0_1_from_the_cli(fraction, tmp_path, tiny_model_dir, pair_files, capsys):
    args = fit_args(tmp_path, tiny_model_dir, pair_files["sft"], "--data.rejected_column", "null",
                    "--data.val_fraction", fraction, objective="SFT")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2  # one line, no traceback
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: val_fraction must be in (0, 1), got {float(fraction)}"


def test_no_pad_token_and_no_remote_code_end_to_end(tmp_path, tiny_model_dir, pair_files, monkeypatch):
    """A tokenizer without a pad token trains; every load passes trust_remote_code=False by default."""
    model_dir = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token_id is None

    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    cli = main(fit_args(tmp_path, model_dir, pair_files["sft"], "--data.rejected_column", "null",
                        "--trainer.max_steps", "2", objective="SFT"))
    assert cli.trainer.global_step == 2
    assert cli.datamodule.tokenizer.pad_token_id == cli.datamodule.tokenizer.eos_token_id
    assert {name for name, _ in calls} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(trust is False for _, trust in calls), calls


# --- interrupted runs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe,extra",
    [
        pytest.param("drdo", [], id="drdo-max_epochs"),
        pytest.param("dpo", ["--trainer.max_steps", "60"], id="dpo-max_steps", marks=pytest.mark.slow),
        pytest.param("dpo", ["--model.precompute_reference", "true"], id="dpo-precomputed-max_epochs",
                     marks=pytest.mark.slow),
    ],
)
def test_sigkill_then_resume_continues_a_shipped_recipe(recipe, extra, tmp_path, tiny_model_dir, recipe_data, monkeypatch):
    """A recipe killed between two checkpoints and resumed goes on as if never interrupted."""
    # Bitwise equality needs one thread count in every run: following the free cores could differ.
    monkeypatch.setenv("DRDO_THREADS", "off")

    def args(run: Path, *more: str) -> list[str]:
        return recipe_args(recipe, tiny_model_dir, recipe_data, run / "losses", "--trainer.max_epochs", str(RECIPE_EPOCHS),
                           *extra, *more)

    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    for run in (uninterrupted, interrupted):
        run.mkdir()
    monkeypatch.chdir(uninterrupted)
    reference = main(args(uninterrupted))
    steps, per_epoch = reference.trainer.global_step, reference.trainer.num_training_batches
    assert RECIPE_CADENCE < KILL_STEP // per_epoch * per_epoch < KILL_STEP < steps  # an epoch ends between

    killed = start_cli(args(interrupted, "--trainer.callbacks+=probes.SigkillAtStep", "--trainer.callbacks.step",
                            str(KILL_STEP)), interrupted)
    output = finished_output(killed)
    assert killed.returncode == -signal.SIGKILL, output[-4000:]
    last = interrupted / "runs" / recipe / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == RECIPE_CADENCE  # older than the kill
    before_kill = step_losses(interrupted / "losses")
    (interrupted / "losses").unlink()

    monkeypatch.chdir(interrupted)
    resumed = main(args(interrupted, "--ckpt_path", "last"))
    assert resumed.trainer.global_step == steps
    # Step for step the same losses (bitwise): up to the kill, then again from the checkpoint on.
    expected = step_losses(uninterrupted / "losses")
    assert list(expected) == list(range(1, steps + 1))
    assert before_kill == {step: expected[step] for step in range(1, KILL_STEP + 1)}
    assert step_losses(interrupted / "losses") == {step: expected[step] for step in range(RECIPE_CADENCE + 1, steps + 1)}
    assert_same_exports(interrupted / "runs" / recipe / "export", uninterrupted / "runs" / recipe / "export")


def test_epoch_end_checkpoint_resumes_exactly_by_max_epochs_and_warns_by_max_steps(
    tmp_path, tiny_model_dir, recipe_data, monkeypatch
):
    """A checkpoint written as an epoch ends (a user's per-epoch ModelCheckpoint beside the recipe's
    step one); Lightning 2.6 resumes it exactly only without ``max_steps`` (see
    ``reliability.warn_if_resume_repeats_an_epoch``)."""

    def run(root: Path, *more: str):
        root.mkdir(exist_ok=True)
        monkeypatch.chdir(root)
        per_epoch_checkpoints = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                                 "--trainer.callbacks.dirpath", "epoch_checkpoints", "--trainer.callbacks.save_last", "true"]
        # SFT: a recipe whose own callbacks do not select by validation (the Oracle's keep its best
        # checkpoint, validating every 25 batches across epochs, which this epoch-end restart is not about).
        return main(recipe_args("sft", tiny_model_dir, recipe_data, root / "losses", "--trainer.max_epochs", "2",
                                *per_epoch_checkpoints, *more))

    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    steps = run(uninterrupted).trainer.global_step
    per_epoch = steps // 2
    run(interrupted, "--trainer.callbacks+=probes.StopAfterSteps", "--trainer.callbacks.steps", str(per_epoch))
    epoch_end = tmp_path / "epoch_end.ckpt"
    shutil.copy(interrupted / "epoch_checkpoints" / "last.ckpt", epoch_end)
    assert torch.load(epoch_end, weights_only=True)["global_step"] == per_epoch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run(interrupted, "--ckpt_path", str(epoch_end))
    assert not [w for w in caught if "counts that epoch twice" in str(w.message)]
    assert resumed.trainer.global_step == steps
    assert step_losses(interrupted / "losses") == step_losses(uninterrupted / "losses")
    assert_same_exports(interrupted / "runs" / "sft" / "export", uninterrupted / "runs" / "sft" / "export")

    # Bounded by max_steps instead, at the same length (so the same learning-rate schedule).
    with pytest.warns(UserWarning, match=r"--trainer.max_steps .* from a checkpoint written as epoch 0 ended"):
        cut_short = run(tmp_path / "by_steps", "--trainer.max_steps", str(steps), "--ckpt_path", str(epoch_end))
    assert cut_short.trainer.global_step < steps


def test_train_loader_resumes_where_training_was_with_workers(pair_files, tiny_model_dir):
    dm = PreferenceDataModule(train_file=str(pair_files["train"]), tokenizer=str(tiny_model_dir), cache_dir=None,
                              batch_size=8, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 5}  # what training took, not what the workers read ahead
    rest = [b["chosen_input_ids"] for b in batches]

    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    resumed = [b["chosen_input_ids"] for b in fresh]
    assert len(resumed) == len(rest) == len(loader) - 5
    assert all(torch.equal(a, b) for a, b in zip(resumed, rest))
    fresh.load_state_dict({"epoch": 1, "batches": len(loader)})  # saved as the epoch ended
    assert fresh.sampler.epoch == 2 and len(list(fresh)) == len(loader)


def test_data_module_gives_the_saved_position_to_a_training_loader_made_before_or_after(pair_files, tiny_model_dir):
    def data_module() -> PreferenceDataModule:
        dm = PreferenceDataModule(train_file=str(pair_files["train"]), tokenizer=str(tiny_model_dir), cache_dir=None,
                                  batch_size=8)
        dm.setup("fit")
        return dm

    trained = data_module()
    batches = iter(trained.train_dataloader())
    for _ in range(5):
        next(batches)
    state = trained.state_dict()
    assert state == {"train_loader": {"epoch": 0, "batches": 5}}
    rest = [b["chosen_input_ids"] for b in batches]

    before = data_module()
    loader = before.train_dataloader()  # as when the strategy restores the checkpoint after setting up
    before.load_state_dict(state)
    after = data_module()
    after.load_state_dict(state)  # as when the data module is restored first
    for resumed in (loader, after.train_dataloader()):
        got = [b["chosen_input_ids"] for b in resumed]
        assert len(got) == len(rest) > 0 and all(torch.equal(a, b) for a, b in zip(got, rest))
    assert len(list(after.train_dataloader())) == len(loader)  # a later loader (next epoch) starts at 0


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, tiny_model_dir, pair_files):
    args = fit_args(
        tmp_path, tiny_model_dir, pair_files["sft"], "--data.rejected_column", "null", "--trainer.max_steps", "100000",
        "--trainer.callbacks.every_n_epochs", "0",  # no regular saves
        "--trainer.logger.flush_logs_every_n_steps", "1", objective="SFT", checkpoints=0,
    )
    proc = start_cli(args, tmp_path)
    wait_for(tmp_path / "lightning_logs" / "version_0" / "metrics.csv", proc)  # a step has run
    proc.send_signal(signal.SIGTERM)
    output = finished_output(proc)
    assert proc.returncode == 143, output  # 128 + SIGTERM: not mistaken for a finished run
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] >= 1
    assert (tmp_path / "checkpoints" / f"epoch={last['epoch']}-step={last['global_step']}.ckpt").is_file()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path) == {"step": 1}  # the previous checkpoint is intact
    assert list(tmp_path.iterdir()) == [path]  # and no temporary file is left


def test_truncated_checkpoint_is_one_line_naming_the_intact_one(reference_run, tmp_path, tiny_model_dir, pair_files, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    data = (reference_run / "checkpoints" / "last.ckpt").read_bytes()
    intact = folder / "step=2.ckpt"
    intact.write_bytes(data)
    truncated = folder / "last.ckpt"  # written after it, cut short (a full disk)
    truncated.write_bytes(data[: len(data) // 2])
    args = fit_args(tmp_path, tiny_model_dir, pair_files["train"], *SCORES, "--trainer.max_steps", str(RESUME_STEPS + 1),
                    "--ckpt_path", str(truncated))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"error: {truncated}: not a readable checkpoint, probably truncated")
    assert line.endswith(f"Resume from an earlier one: --ckpt_path {intact} (the newest of 1 beside it).")
    with pytest.raises(CheckpointError, match="No other checkpoint in"):  # in Python, the same error as an exception
        raise unreadable_checkpoint(tmp_path / "lone.ckpt", EOFError())


# --- numerical faults ----------------------------------------------------------------------------


def poison_sft(monkeypatch, nan_loss_steps=(), nan_grad_steps=()) -> dict[int, list[torch.Tensor]]:
    """Make SFT's loss NaN, or its loss finite but one gradient NaN, at the given steps.

    Returns the weights seen at the start of every training step, by step.
    """
    weights: dict[int, list[torch.Tensor]] = {}
    original = SFT.pair_loss

    def pair_loss(self, batch, out):
        loss, logged = original(self, batch, out)
        step = self.trainer.global_step
        weights[step] = [p.detach().clone() for p in self.parameters()]
        if step in nan_loss_steps:
            loss = loss * float("nan")
        if step in nan_grad_steps:  # d sqrt(x)/dx = inf at 0, times 0: a NaN gradient, a finite loss
            loss = loss + 0.0 * torch.sqrt(0.0 * self.policy.lm.model.norm.weight.sum())
        return PairLoss(loss, logged)

    monkeypatch.setattr(SFT, "pair_loss", pair_loss)
    return weights


def sft_args(root, tiny_model_dir, pair_files, *extra):
    # Unfused: the NaN gradient is poisoned through a weight outside the LM head, which the fused head's
    # per-chunk loss does not differentiate.
    return fit_args(root, tiny_model_dir, pair_files["sft"], "--data.rejected_column", "null", "--model.chunked_head",
                    "false", *extra, objective="SFT")


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path, tiny_model_dir, pair_files, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="drdo_lightning.reliability")
    weights = poison_sft(monkeypatch, nan_loss_steps={2}, nan_grad_steps={4})
    cli = main(sft_args(tmp_path, tiny_model_dir, pair_files, "--trainer.max_steps", "7"))
    assert cli.trainer.global_step == 7  # training went on
    for step in range(6):
        changed = not same(weights[step], weights[step + 1])
        assert changed == (step not in (2, 4)), step  # skipped steps left the weights exactly as they were
    optimizer = cli.trainer.optimizers[0]
    assert {int(optimizer.state[p]["step"]) for p in cli.model.parameters()} == {5}  # AdamW stepped 7 - 2 times
    assert all(p.isfinite().all() for p in cli.model.parameters())
    (guard,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteGuard)]
    assert guard.total == 2 and guard.consecutive == 0
    assert cli.trainer.logged_metrics["train/nonfinite_steps"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "drdo_lightning.reliability"]
    assert warnings == [
        "step 2 (skipped): non-finite loss [nan]; non-finite metrics: train/loss (1 non-finite steps so far)",
        "step 4 (skipped): non-finite gradients of 1 parameter(s): policy.lm.model.norm.weight (2 non-finite steps so far)",
    ]


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, tiny_model_dir, pair_files, monkeypatch):
    weights = poison_sft(monkeypatch, nan_loss_steps={1, 3, 4, 5})  # step 2 is fine: the count starts again
    with pytest.raises(NonFiniteError) as error:
        main(sft_args(tmp_path, tiny_model_dir, pair_files, "--trainer.max_steps", "20", "--non_finite.max_consecutive", "3"))
    assert str(error.value).startswith(
        "3 optimizer steps in a row were non-finite (--non_finite.max_consecutive 3); "
        "the last: step 5 (skipped): non-finite loss [nan]; non-finite metrics: train/loss."
    )
    assert max(weights) == 5 and same(weights[3], weights[5])


# --- untrusted files -----------------------------------------------------------------------------


def test_checkpoints_load_weights_only_and_exports_are_safetensors(reference_run):
    for path in (reference_run / "checkpoints").glob("*.ckpt"):
        assert torch.load(path, weights_only=True)["state_dict"]  # plain data: no pickled objects needed
    files = {p.name for p in (reference_run / "export").iterdir()}
    assert {"model.safetensors", "reward_head.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files


class _RunsCode:
    """Unpickling this calls Path.touch: the kind of payload a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_with_code_is_refused(reference_run, tmp_path):
    checkpoint = torch.load(reference_run / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "code-ran"
    checkpoint["hyper_parameters"]["note"] = _RunsCode(marker)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: refused to load")):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


def test_no_eval_exec_or_pickle_in_the_package():
    pattern = re.compile(r"(?<![\w.])(eval|exec)\(|\bimport pickle\b|\bpickle\.|weights_only=False|trust_remote_code=True")
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted((ROOT / "drdo_lightning").glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []
