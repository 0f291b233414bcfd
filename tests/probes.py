"""Test-only pieces that tests name on the command line like any other class.

In-process runs find them because pytest puts ``tests/`` on ``sys.path``; the multi-process
tests put ``tests/`` on ``PYTHONPATH`` of their ``python -m drdo_lightning fit`` subprocesses:
``--trainer.callbacks+=probes.MeanLossOverRanks``, ``--model probes.ShardProbeDRDO``, and the judge
``probe-text-hash`` (registered when this module loads, as the class named on the command line loads it).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch

from drdo_lightning import DRDO
from drdo_lightning.evaluation.judges import register_judge
from drdo_lightning.online.sampling import GenerateSampler, Samples, step_seed


class MeanLossOverRanks(L.Callback):
    """Log ``probe/loss``: each step's training loss averaged over all ranks.

    The modules log rank 0's own loss at each step (no per-step sync); the mean over ranks is
    the loss of the whole global batch, which is what a single process with that batch sees.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach()
        pl_module.log("probe/loss", loss, on_step=True, on_epoch=False, sync_dist=True, batch_size=1)


class StopAfterSteps(L.Callback):
    """End ``fit`` once ``steps`` optimizer steps are done, like a job cut off by its time limit.

    ``max_steps`` (and so the learning-rate schedule) stays as configured, so a resumed run
    must continue exactly as the uninterrupted one.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class StepLosses(L.Callback):
    """Append ``<global step> <training loss>`` to ``path`` after every optimizer step.

    Written line by line, so a killed run leaves every step it finished; ``repr`` of the float
    reads back bitwise.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step} {outputs['loss'].item()!r}\n")


class SigkillAtStep(L.Callback):
    """Kill this process with SIGKILL once ``step`` optimizer steps are done, as a lost machine would:
    no handler runs and nothing more is saved. Checkpoint callbacks run after this one, so a step
    checkpoint due at ``step`` is not written either."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class ShardProbeDRDO(DRDO):
    """DRDO that records, right after ``configure_model``, what this rank holds of each parameter.

    Writes ``<probe_dir>/rank<R>.json``: ``{name: [full numel, local shard numel, numel of the
    tensor as seen]}``. Under ZeRO-3 the parameters come out of ``configure_model`` already
    partitioned: the tensor as seen is empty and the shard is about ``1 / world_size`` of it.
    """

    def __init__(self, *args, probe_dir: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probe_dir = Path(probe_dir)

    def configure_model(self) -> None:
        super().configure_model()
        record = {
            name: [getattr(p, "ds_numel", p.numel()), p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel(), p.numel()]
            for name, p in self.policy.named_parameters()
        }
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        (self.probe_dir / f"rank{rank}.json").write_text(json.dumps(record))


class OutputDtype(L.Callback):
    """Write ``<path>.rank<R>`` with the dtype of the output projection's result at the first training step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            def record(module, inputs, output):
                Path(f"{self.path}.rank{trainer.global_rank}").write_text(str(output.dtype))
            self.handle = pl_module.policy.lm.get_output_embeddings().register_forward_hook(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.handle.remove()


def text_hash(prompts, responses) -> list[float]:
    """A judge: each response's score a hash of its text in [0, 1), the same in every process (unlike
    Python's salted ``hash``); two responses tie only where their texts are equal."""
    return [int.from_bytes(hashlib.sha256(r.encode()).digest()[:4], "little") / 2**32 for r in responses]


register_judge("probe-text-hash", text_hash)


class PromptSeededSampler:
    """Hugging Face ``generate`` on each prompt alone, seeded by the prompt's text: a prompt's samples
    depend on it and the weights only, not on the rank, step or batch it comes in (the run's own
    sampler seeds by step and rank, so two processes would draw other samples than one)."""

    def __init__(self, tokenizer, max_prompt_length: int) -> None:
        self.generate = GenerateSampler(tokenizer, max_prompt_length)

    def __call__(self, model, prompts, options, seed: int) -> Samples:
        alone = [self.generate(model, [p], options, step_seed(0, json.dumps(p))) for p in prompts]
        return Samples(prompts=list(prompts), k=options.k, prompt_ids=[s.prompt_ids[0] for s in alone],
                       response_ids=[ids for s in alone for ids in s.response_ids],
                       texts=[t for s in alone for t in s.texts], ended=[e for s in alone for e in s.ended])


class PromptSeededDRDO(DRDO):
    """Online DRDO sampling through :class:`PromptSeededSampler`; from training step ``ties_on_rank_one_from``
    on, the judge of rank 1 scores every sample alike, so that rank has no pair while the others do."""

    def __init__(self, *args, ties_on_rank_one_from: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ties_on_rank_one_from = ties_on_rank_one_from

    def make_sampler(self, tokenizer, max_prompt_length: int) -> PromptSeededSampler:
        return PromptSeededSampler(tokenizer, max_prompt_length)

    def start_online(self, tokenizer, device: torch.device, max_prompt_length: int) -> None:
        super().start_online(tokenizer, device, max_prompt_length)
        judge = self.online_source.judge

        def tying(prompts, responses) -> list[float]:
            start = self.ties_on_rank_one_from
            if self.global_rank == 1 and start is not None and self.global_step >= start:
                return [0.0] * len(responses)
            return judge(prompts, responses)

        self.online_source.judge = tying
