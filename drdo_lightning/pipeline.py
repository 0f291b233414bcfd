"""Multi-stage runs built from the recipe configs: the same commands a user runs, chained.

``python -m drdo_lightning build-embedded-default`` rebuilds everything under
``embedded_default/`` from scratch (run from the repository root):
generated data and tokenizer -> SFT (configs/sft.yaml) -> Oracle (configs/oracle.yaml, Eq. 5)
-> Oracle rewards precomputed as data columns (``score``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from drdo_lightning import demo
from drdo_lightning.scoring import score

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EMBEDDED_LENGTHS = {"max_prompt_length": 64, "max_length": 128}


def fit_recipe(recipe: str, root: Path, *overrides: str) -> Path:
    """Run ``fit --config configs/<recipe>.yaml`` with every output under ``root``; return the export dir."""
    from drdo_lightning.cli import main  # deferred: cli imports this module

    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True}},
        {"class_path": "drdo_lightning.ExportHuggingFace", "init_args": {"dirpath": str(root / "export")}},
    ]
    main(
        [
            "fit",
            "--config", str(CONFIG_DIR / f"{recipe}.yaml"),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.callbacks", json.dumps(callbacks),
            *overrides,
        ]
    )
    return root / "export"


def _install(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def build_embedded_default(out: str = "embedded_default", work: str = "runs/embedded_default_build", seed: int = 0) -> Path:
    """Rebuild the embedded default: data, base model, SFT policy, Oracle, Oracle-scored pairs.

    Args:
        out: The shipped folder the recipe configs read from.
        work: Scratch folder for raw data, logs and checkpoints of the build.
        seed: Seed of the data generator and of every training run.
    """
    out_dir, work_dir = Path(out), Path(work)
    shutil.rmtree(work_dir, ignore_errors=True)
    raw = demo.write_task(work_dir, seed=seed)
    _install(raw["base_model"], out_dir / "base_model")
    for split in ("sft", "eval"):
        _install(raw[split], out_dir / "data" / f"{split}.jsonl")

    seed_arg = ("--seed_everything", str(seed))
    sft = fit_recipe("sft", work_dir / "sft", *seed_arg, "--data.val_file", str(raw["val"]))
    _install(sft, out_dir / "sft_policy")
    oracle = fit_recipe(
        "oracle", work_dir / "oracle", *seed_arg, "--data.train_file", str(raw["train"]), "--data.val_file", str(raw["val"])
    )
    _install(oracle, out_dir / "oracle")
    for split in ("train", "val"):
        score([str(out_dir / "oracle")], str(raw[split]), str(out_dir / "data" / f"{split}.jsonl"), overwrite=True, **EMBEDDED_LENGTHS)
    return out_dir
