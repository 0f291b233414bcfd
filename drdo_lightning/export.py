"""Export a trained policy as a Hugging Face directory at the end of ``fit``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


def default_export_dir(trainer: L.Trainer) -> Path:
    """``<default_root_dir>/export``: one predictable place per run directory."""
    return Path(trainer.default_root_dir) / "export"


class ExportHuggingFace(L.Callback):
    """Write ``save_pretrained`` output (config, safetensors, tokenizer, reward head) on fit end.

    The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` for
    generation and with ``drdo_lightning.CausalLMWithRewardHead.from_pretrained`` for the
    reward head too. It holds the weights at the end of training.

    Args:
        dirpath: Output directory; default ``<trainer.default_root_dir>/export``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.dirpath) if self.dirpath else default_export_dir(trainer)
        if trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            pl_module.policy.save_pretrained(path, tokenizer=tokenizer)
            rank_zero_info(f"Exported the trained model to {path}")
        trainer.strategy.barrier("export")
