"""Command line: ``python -m drdo_lightning <command> --config ...``.

- ``fit``, ``validate``, ``test``, ``predict``: a LightningCLI. Every constructor argument of
  the chosen objective (``model``), of :class:`PreferenceDataModule` (``data``) and of the
  Trainer is an option and a YAML key.
- ``score``: precompute reward-model scores as data columns (:func:`scoring.score`).
- ``export``: a checkpoint (Lightning or DeepSpeed) as a Hugging Face directory (:func:`export.export`).
- ``train-ensemble``, ``paper-pipeline``: multi-stage runs (:mod:`pipeline`).
- ``build-embedded-default``: rebuild ``embedded_default/`` from scratch
  (:func:`pipeline.build_embedded_default`).
"""

from __future__ import annotations

import sys
from unittest import mock

from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from drdo_lightning.data import PreferenceDataModule
from drdo_lightning.evaluation import evaluate
from drdo_lightning.experiments import ablations, robustness, splits
from drdo_lightning.export import export
from drdo_lightning.modules import PreferenceModule
from drdo_lightning.pipeline import build_embedded_default, paper_pipeline, train_ensemble
from drdo_lightning.safety import CheckpointOnSigterm, NonFiniteGuard, unreadable_checkpoint
from drdo_lightning.scoring import score

# Commands that are plain typed functions: their signature is their command line.
FUNCTION_COMMANDS = {
    "score": score,
    "export": export,
    "train-ensemble": train_ensemble,
    "paper-pipeline": paper_pipeline,
    "build-embedded-default": build_embedded_default,
    "evaluate": evaluate,
    "robustness": robustness,
    "ablations": ablations,
    "splits": splits,
}


class DRDOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenized with the model's own tokenizer.
        parser.link_arguments("model.init_args.model", "data.tokenizer")
        # Always on: non-finite steps are skipped and counted; --non_finite.max_consecutive in a row stop the run.
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite")

    def parse_arguments(self, parser, args) -> None:
        # main() hands over the whole command line as ``args``; LightningCLI would warn whenever
        # sys.argv holds arguments too (a fit nested in a sweep, a notebook kernel, pytest). Only
        # parsing sees the trimmed argv: launchers that re-run the script still read the real one.
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the model's hyperparameters from --ckpt_path (weights-only) before the
        # Trainer loads it: an unreadable file fails here first, so name it here too.
        try:
            super()._parse_ckpt_path()
        except Exception as e:
            raise unreadable_checkpoint(self.config[self.config.subcommand].get("ckpt_path"), e) from e


def main(args: list[str] | None = None):
    """Run a command; returns the LightningCLI (its ``model``, ``datamodule``, ``trainer``) or the function's result."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in FUNCTION_COMMANDS:
        return CLI(FUNCTION_COMMANDS[argv[0]], args=argv[1:], as_positional=False)
    return DRDOCLI(
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        # Checkpoints are written atomically and loaded weights-only; SIGTERM saves one (drdo_lightning.safety).
        trainer_defaults={
            "plugins": [{"class_path": "drdo_lightning.safety.AtomicCheckpointIO"}],
            "callbacks": [CheckpointOnSigterm()],
        },
        args=argv,
    )
