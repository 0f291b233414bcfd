"""Training stages that chain recipes: an SFT policy, the Oracle and reward-model ensemble, scored data."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from drdo_lightning.data.readers import read_rows
from drdo_lightning.errors import SettingError
from drdo_lightning.models import REWARD_HEAD_FILE
from drdo_lightning.recipes import read_config
from drdo_lightning.scoring import score
from drdo_lightning.training import DataSpec, FitResult, RunSpec, run_fit

# What the teacher recipes (oracle, reward_model) select their checkpoint by, and what they export.
SELECTION_METRIC = "val/reward_accuracy"


def train_ensemble(
    config: str = "reward_model", members: int = 3, out: str = "runs/reward_ensemble",
    overrides: dict[str, Any] | None = None,
) -> list[Path]:
    """Train reward models (paper Eq. 2) that differ only in the reward head's initialisation.

    Member ``k`` runs the recipe with ``model.reward_head_seed = k``; data order and every other
    setting are shared. Exports land in ``<out>/member_<k>/export``; with the shipped recipe each is
    the member's best checkpoint by validation reward accuracy, which is printed.

    Args:
        config: Recipe name or YAML path.
        members: Ensemble size (paper: 3).
        out: Output folder.
        overrides: Dotted config keys for every member, e.g. ``{"model.model": "path"}``.
    """
    runs = ensemble_runs(RunSpec(config, overrides=overrides or {}), members, Path(out))
    for k, result in enumerate(runs):
        validation = teacher_validation(result)
        if validation["reward_accuracy"] is not None:
            print(f"member {k}: validation reward accuracy {validation['reward_accuracy']:.3f} "
                  f"(step {validation['step']}, exported)")
    return [r.export_dir for r in runs]


def ensemble_runs(run: RunSpec, members: int, out: Path) -> list[FitResult]:
    """``members`` runs of ``run`` into ``out/member_<k>``, with reward-head seeds 0..members-1."""
    return [
        run_fit(replace(run, run_dir=out / f"member_{k}", overrides={**run.overrides, "model.reward_head_seed": k}))
        for k in range(members)
    ]


def teacher_validation(result: FitResult) -> dict[str, float | None]:
    """A teacher run's validation reward accuracy as exported: the selected checkpoint's
    (``selected/val/reward_accuracy``) and its step, else the last validation's (an export of the
    final weights); None where the run never validated."""
    metrics = result.metrics
    selected = metrics.get(f"selected/{SELECTION_METRIC}")
    accuracy = selected if selected is not None else metrics.get(SELECTION_METRIC)
    step = metrics.get("selected/step") if selected is not None else (result.global_step if accuracy is not None else None)
    return {"reward_accuracy": accuracy, "step": None if step is None else int(step), "global_step": result.global_step}


@dataclass(frozen=True)
class Judges:
    """The Oracle, the reward-model ensemble, and the pairs they scored (``train``, ``val``)."""

    oracle: Path
    ensemble: list[Path]
    scored: dict[str, Path]
    # Per teacher (``oracle``, ``member_<k>``): its validation reward accuracy as exported, the step
    # it was selected at, and the split that validated it (:func:`teacher_validation`, ``selection``).
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)


def has_label_noise(run: RunSpec) -> bool:
    """Whether ``run`` trains on noisy labels: a ``label_flip_rate`` above 0 or a ``label_noise`` other
    than ``uniform``, set by its recipes or by the run itself."""
    data: dict[str, Any] = {}
    for layer in run.layers():
        data.update(read_config(layer).get("data") or {})
    data.update({k.removeprefix("data."): v for k, v in run.settings().items() if k.startswith("data.")})
    return (data.get("label_flip_rate") or 0) > 0 or (data.get("label_noise") or "uniform") != "uniform"


def selection_overrides(selection: str, held_out_fraction: float) -> dict[str, Any]:
    """The data options that validate a teacher on ``selection``: ``held_out``, a split carved from the
    training file carrying its label noise; ``val_file``, the validation file as it is."""
    if selection == "val_file":
        return {}
    if selection != "held_out":
        raise SettingError(f"selection must be auto, held_out or val_file, got {selection!r}")
    return {"data.val_file": None, "data.val_fraction": held_out_fraction, "data.noise_validation": True}


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
    selection: Literal["auto", "held_out", "val_file"] = "auto", held_out_fraction: float = 0.1,
    epochs_scale: float = 1.0,
) -> Judges:
    """Oracle (Eq. 5) and reward-model ensemble (Eq. 2) from ``policy``, then score train/val.

    ``shared`` holds what every judge's run has in common (seed, token budgets, budget, label
    flips, other options); the recipe, model, data files and folder are set here.
    ``oracle_policy`` starts the Oracle from another (e.g. larger) SFT policy than the ensemble's;
    ``oracle_in_bf16`` stores it in bfloat16 before it scores, so the scores are the stored model's.
    The scored files carry ``oracle_{chosen,rejected}`` (numbers) and
    ``ensemble_{chosen,rejected}`` (lists, one number per member).

    Every judge validates as it trains, whatever ``shared.validate`` says, and exports its best
    checkpoint by validation reward accuracy, stopping early when it stops improving (the
    ``oracle`` and ``reward_model`` recipes' callbacks); ``shared.max_steps`` is then a ceiling.
    What it validates on is ``selection``:

    - ``held_out``: ``held_out_fraction`` of ``data["train"]``, carved out (``data.val_fraction``,
      seeded by the run's ``data.seed``) with the training labels' noise applied to it too
      (``data.noise_validation``). The judges train on the rest; no clean label reaches them.
    - ``val_file``: ``data["val"]`` as it is; its labels are never flipped, so under label noise
      the choice of checkpoint would see clean labels.
    - ``auto`` (default): ``held_out`` when ``shared`` (or its recipe) sets label noise, else ``val_file``.

    ``epochs_scale`` multiplies each recipe's ``trainer.max_epochs`` (rounded up): judges of a
    subset holding a fraction f of some pairs, at ``1 / f``, get the step ceiling of judges of all
    of them (:func:`scaled_epochs`).

    Each judge's validation reward accuracy as exported (:func:`teacher_validation`) is in
    :attr:`Judges.validation` and in ``<work>/judges.json``.
    """
    if selection == "auto":
        selection = "held_out" if has_label_noise(replace(shared, recipe="oracle")) else "val_file"
    overrides = {**shared.overrides, **selection_overrides(selection, held_out_fraction)}
    judge = replace(shared, model=policy, train_file=data["train"], val_file=data["val"], validate=True,
                    overrides=overrides)
    if selection == "held_out":
        judge = replace(judge, val_file=None)

    def judge_of(recipe: str, **changes) -> RunSpec:
        return replace(judge, recipe=recipe, overrides={**overrides, **scaled_epochs(recipe, epochs_scale)}, **changes)

    oracle_run = run_fit(judge_of("oracle", model=oracle_policy or policy, run_dir=work / "oracle"))
    oracle = oracle_run.export_dir
    if oracle_in_bf16:
        store_in_bf16(oracle)
    member_runs = ensemble_runs(judge_of("reward_model"), members, work / "ensemble")
    ensemble = [r.export_dir for r in member_runs]
    runs = {"oracle": oracle_run, **{f"member_{k}": r for k, r in enumerate(member_runs)}}
    validation = {name: {**teacher_validation(r), "selection": selection} for name, r in runs.items()}
    work.mkdir(parents=True, exist_ok=True)
    (work / "judges.json").write_text(json.dumps(validation, indent=1))
    options = (shared.data or DataSpec()).score_options()
    scored = scored_files(work)
    for split, path in scored.items():
        score_with_judges(oracle, ensemble, data[split], path, options)
    return Judges(oracle, ensemble, scored, validation)


def scaled_epochs(recipe: str, scale: float) -> dict[str, int]:
    """The override that runs ``recipe`` for ``scale`` times its ``trainer.max_epochs``, rounded up
    (none at scale 1, or for a recipe without an epoch limit)."""
    epochs = read_config(recipe).get("trainer", {}).get("max_epochs")
    if scale == 1 or epochs is None or epochs < 0:
        return {}
    return {"trainer.max_epochs": math.ceil(epochs * scale)}


def score_with_judges(oracle: Path | str, ensemble: list[Path] | list[str], pairs: Path | str, out: Path,
                      options: dict[str, Any]) -> Path:
    """``pairs`` with ``oracle_*`` columns from the Oracle and ``ensemble_*`` lists from the ensemble,
    written to ``out`` (the Oracle's pass goes to ``<out stem>.oracle.jsonl`` beside it)."""
    with_oracle = out.with_name(f"{out.name.split('.')[0]}.oracle.jsonl")
    score([str(oracle)], str(pairs), str(with_oracle), overwrite=True, **options)
    score([str(m) for m in ensemble], str(with_oracle), str(out), output_prefix="ensemble_", overwrite=True, **options)
    return out


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
