"""Command line: ``python -m drdo_lightning {fit,validate,test,predict} --config ...``.

A LightningCLI: every constructor argument of the chosen objective (``model``), of
:class:`PreferenceDataModule` (``data``) and of the Trainer is an option and a YAML key.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from drdo_lightning.data import PreferenceDataModule
from drdo_lightning.modules import PreferenceModule


class DRDOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenized with the model's own tokenizer.
        parser.link_arguments("model.init_args.model", "data.tokenizer")


def main(args: list[str] | None = None) -> None:
    DRDOCLI(
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
