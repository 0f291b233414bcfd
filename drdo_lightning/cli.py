"""Command line: ``python -m drdo_lightning <command> --config ...``.

- ``fit``, ``validate``, ``test``, ``predict``: a LightningCLI. Every constructor argument of
  the chosen objective (``model``), of :class:`PreferenceDataModule` (``data``) and of the
  Trainer is an option and a YAML key.
- ``score``: precompute reward-model scores as data columns (:func:`scoring.score`).
- ``build-embedded-default``: rebuild ``embedded_default/`` from scratch
  (:func:`pipeline.build_embedded_default`).
"""

from __future__ import annotations

import sys

from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from drdo_lightning.data import PreferenceDataModule
from drdo_lightning.modules import PreferenceModule
from drdo_lightning.pipeline import build_embedded_default
from drdo_lightning.scoring import score

# Commands that are plain typed functions: their signature is their command line.
FUNCTION_COMMANDS = {"score": score, "build-embedded-default": build_embedded_default}


class DRDOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenized with the model's own tokenizer.
        parser.link_arguments("model.init_args.model", "data.tokenizer")


def main(args: list[str] | None = None):
    """Run a command; returns the LightningCLI (its ``model``, ``datamodule``, ``trainer``) or the function's result."""
    args = sys.argv[1:] if args is None else list(args)
    if args and args[0] in FUNCTION_COMMANDS:
        return CLI(FUNCTION_COMMANDS[args[0]], args=args[1:], as_positional=False)
    return DRDOCLI(
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
