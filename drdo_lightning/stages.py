"""Training stages that chain recipes: an SFT policy, the Oracle and reward-model ensemble, scored data."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from drdo_lightning.data.readers import read_rows
from drdo_lightning.models import REWARD_HEAD_FILE
from drdo_lightning.scoring import score
from drdo_lightning.training import DataSpec, RunSpec, run_fit


def train_ensemble(
    config: str = "reward_model", members: int = 3, out: str = "runs/reward_ensemble",
    overrides: dict[str, Any] | None = None,
) -> list[Path]:
    """Train reward models (paper Eq. 2) that differ only in the reward head's initialisation.

    Member ``k`` runs the recipe with ``model.reward_head_seed = k``; data order and every other
    setting are shared. Exports land in ``<out>/member_<k>/export``.

    Args:
        config: Recipe name or YAML path.
        members: Ensemble size (paper: 3).
        out: Output folder.
        overrides: Dotted config keys for every member, e.g. ``{"model.model": "path"}``.
    """
    return ensemble_members(RunSpec(config, overrides=overrides or {}), members, Path(out))


def ensemble_members(run: RunSpec, members: int, out: Path) -> list[Path]:
    """The exports of ``members`` runs of ``run`` into ``out/member_<k>``, with reward-head seeds 0..members-1."""
    return [
        run_fit(replace(run, run_dir=out / f"member_{k}", overrides={**run.overrides, "model.reward_head_seed": k})).export_dir
        for k in range(members)
    ]


@dataclass(frozen=True)
class Judges:
    """The Oracle, the reward-model ensemble, and the pairs they scored (``train``, ``val``)."""

    oracle: Path
    ensemble: list[Path]
    scored: dict[str, Path]


def scored_files(work: Path) -> dict[str, Path]:
    """Where :func:`train_judges_and_score` into ``work`` writes the pairs it scored."""
    return {split: work / "data" / f"{split}.scored.jsonl" for split in ("train", "val")}


# Shards of a stored model stay under this size, so no file of the repository grows large.
SHARD_SIZE = "4MB"


def store_in_bf16(model_dir: Path) -> None:
    """Rewrite an exported model's weights in bfloat16, in place (half the bytes), in shards of at
    most :data:`SHARD_SIZE` (transformers' sharded format: it loads them as one model).

    Loading keeps bfloat16 (transformers reads ``dtype`` from the config); :func:`scoring.load_scorer`
    computes in float32 on CPU.
    """
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    for old in [*model_dir.glob("model*.safetensors"), *model_dir.glob("model.safetensors.index.json")]:
        old.unlink()
    lm.save_pretrained(model_dir, max_shard_size=SHARD_SIZE)
    head = model_dir / REWARD_HEAD_FILE
    if head.is_file():
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(head).items()}, head, metadata={"format": "pt"})


def train_judges_and_score(
    work: Path, data: dict[str, Path], policy: Path, members: int, shared: RunSpec,
    oracle_policy: Path | None = None, oracle_in_bf16: bool = False,
) -> Judges:
    """Oracle (Eq. 5) and reward-model ensemble (Eq. 2) from ``policy``, then score train/val.

    ``shared`` holds what every judge's run has in common (seed, token budgets, budget, label
    flips, other options); the recipe, model, data files and folder are set here.
    ``oracle_policy`` starts the Oracle from another (e.g. larger) SFT policy than the ensemble's;
    ``oracle_in_bf16`` stores it in bfloat16 before it scores, so the scores are the stored model's.
    The scored files carry ``oracle_{chosen,rejected}`` (numbers) and
    ``ensemble_{chosen,rejected}`` (lists, one number per member).
    """
    judge = replace(shared, model=policy, train_file=data["train"], val_file=data["val"])
    oracle = run_fit(replace(judge, recipe="oracle", model=oracle_policy or policy, run_dir=work / "oracle")).export_dir
    if oracle_in_bf16:
        store_in_bf16(oracle)
    ensemble = ensemble_members(replace(judge, recipe="reward_model"), members, work / "ensemble")
    options = (shared.data or DataSpec()).score_options()
    scored = scored_files(work)
    for split, path in scored.items():
        with_oracle = path.with_name(f"{split}.oracle.jsonl")
        score([str(oracle)], str(data[split]), str(with_oracle), overwrite=True, **options)
        score([str(m) for m in ensemble], str(with_oracle), str(path), output_prefix="ensemble_", overwrite=True, **options)
    return Judges(oracle, ensemble, scored)


def oracle_accuracy(scored_val: Path) -> float:
    """The Oracle's preference accuracy on the (clean) validation pairs it rescored."""
    return statistics.fmean(row["oracle_chosen"] > row["oracle_rejected"] for _, row in read_rows(str(scored_val)))


def train_sft(run: RunSpec) -> Path:
    """The ``sft`` recipe as ``run`` sets it up (base model, SFT data, folder); returns the export,
    reused when it exists."""
    export_dir = Path(run.run_dir) / "export"
    if (export_dir / "config.json").is_file():
        return export_dir
    return run_fit(replace(run, recipe="sft")).export_dir
