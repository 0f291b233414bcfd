"""Shared fixtures: a tiny tokenizer, a tiny Llama saved to disk, and small preference files.

Nothing is downloaded: the tokenizer is trained on generated text and the model is built
from a config, then saved and loaded through the same path users take.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from drdo_lightning.embedded_default import task as embedded
from drdo_lightning.jsonl import write_jsonl


def fit_argv(root: Path, model_dir: Path, train: Path, *extra: str, objective: str = "DRDO",
             checkpoints: bool | int = False, export: bool = False) -> list[str]:
    """``fit`` arguments for a short CPU run of ``objective`` into ``root``, for ``cli.main``.

    Batches of 8, seed 0, data cached under ``root/cache``, every step logged to
    ``root/lightning_logs/version_N/metrics.csv``; ``checkpoints`` adds a ModelCheckpoint writing
    ``root/checkpoints/last.ckpt`` (none otherwise; a number also saves every that many steps, 0 only
    on SIGTERM), ``export`` the Hugging Face export to
    ``root/export``. ``extra`` comes last, so it overrides any of these.
    """
    argv = [
        "fit", "--model", objective, "--model.model", str(model_dir),
        "--data.train_file", str(train), "--data.cache_dir", str(root / "cache"), "--data.batch_size", "8",
        "--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
        "--seed_everything", "0",
    ]
    if checkpoints is not False:
        argv += ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.dirpath", str(root / "checkpoints"), "--trainer.callbacks.save_last", "true"]
        if checkpoints is not True:
            argv += ["--trainer.callbacks.every_n_train_steps", str(checkpoints)]
    else:
        argv += ["--trainer.enable_checkpointing", "false"]
    if export:
        argv += ["--trainer.callbacks+=drdo_lightning.ExportHuggingFace"]
    return [*argv, *extra]


@pytest.fixture(scope="session")
def tiny_task() -> dict[str, list[dict]]:
    task = embedded.generate_task(seed=0, n_sft=64, n_train=96, n_val=24, n_eval=8)
    for split in ("train", "val"):
        for row in task[split]:  # the gold reward stands in for an Oracle in tests
            row["oracle_chosen"], row["oracle_rejected"] = row["gold_chosen"], row["gold_rejected"]
    return task


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_task):
    texts = [r["prompt"] + " " + r["chosen"] for r in tiny_task["sft"]]
    return embedded.train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = embedded.tiny_llama_config(
        len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def padded_responses(tiny_lm):
    """``make(side)``: three random prompt+response rows of different lengths, padded on ``side``.

    Returns ``(input_ids, attention_mask, labels)`` with labels ``-100`` outside the responses,
    as the collator builds them; draws from torch's global RNG, so seed before calling.
    """

    def make(side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompt_lens, response_lens = [3, 5, 2], [4, 2, 6]
        length = max(p + r for p, r in zip(prompt_lens, response_lens))
        ids = torch.zeros(3, length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
            start = length - (p + r) if side == "left" else 0
            ids[b, start : start + p + r] = torch.randint(1, tiny_lm.config.vocab_size, (p + r,))
            mask[b, start : start + p + r] = 1
            labels[b, start + p : start + p + r] = ids[b, start + p : start + p + r]
        return ids, mask, labels

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_lm, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_lm.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory, tiny_task) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {split: write_jsonl(root / f"{split}.jsonl", tiny_task[split]) for split in ("sft", "train", "val")}


@pytest.fixture(scope="session")
def pairs16(tmp_path_factory, tiny_task) -> Path:
    """The first 16 training pairs (with Oracle scores): small enough to overfit or shard in tests."""
    return write_jsonl(tmp_path_factory.mktemp("pairs16") / "pairs.jsonl", tiny_task["train"][:16])
