"""Multi-stage runs built on :func:`training.run_fit`: the recipes, pointed at your data and folders.

- ``train-ensemble``: K reward models that differ only in their reward head's initialisation.
- ``paper-pipeline``: SFT -> Oracle (+ ensemble) -> score -> DRDO, DPO, IPO, e-DPO students ->
  a summary table of their validation metrics -> ``evaluate``'s report (win rates and rewards
  under the Oracle), all under one output folder, on your data.
- ``build-embedded-default``: regenerate ``embedded_default/`` from scratch.
"""

from __future__ import annotations

import csv
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from drdo_lightning import demo
from drdo_lightning.data import read_rows
from drdo_lightning.errors import require_pretrained
from drdo_lightning.evaluation import evaluate
from drdo_lightning.models import REWARD_HEAD_FILE
from drdo_lightning.scoring import score
from drdo_lightning.training import FitResult, run_fit

EMBEDDED = Path("embedded_default")
STUDENTS = ("drdo", "dpo", "ipo", "edpo")
SUMMARY_METRICS = ("loss", "implicit_accuracy", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")


@dataclass(frozen=True)
class DataSpec:
    """How a pipeline reads its pairs: the same token budgets and chat template in every training
    stage and in scoring, so the judges score exactly what the students train on."""

    max_prompt_length: int = 512
    max_length: int = 1024
    chat_template: str | None = None

    def fit_overrides(self) -> dict[str, Any]:
        return {f"data.{k}": v for k, v in vars(self).items()}

    def score_options(self) -> dict[str, Any]:
        return dict(vars(self))


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
    return [
        run_fit(config, {**(overrides or {}), "model.reward_head_seed": k}, run_dir=Path(out) / f"member_{k}").export_dir
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
    work: Path, data: dict[str, Path], policy: Path, seed: int, members: int, spec: DataSpec,
    overrides: dict[str, Any] | None = None, oracle_policy: Path | None = None, oracle_in_bf16: bool = False,
) -> Judges:
    """Oracle (Eq. 5) and reward-model ensemble (Eq. 2) from ``policy``, then score train/val.

    ``overrides`` are extra config keys for every judge's training run (e.g. a label-flip rate).
    ``oracle_policy`` starts the Oracle from another (e.g. larger) SFT policy than the ensemble's;
    ``oracle_in_bf16`` stores it in bfloat16 before it scores, so the scores are the stored model's.
    The scored files carry ``oracle_{chosen,rejected}`` (numbers) and
    ``ensemble_{chosen,rejected}`` (lists, one number per member).
    """
    common = {"seed_everything": seed, "model.model": str(policy), "data.train_file": str(data["train"]),
              "data.val_file": str(data["val"]), **spec.fit_overrides(), **(overrides or {})}
    oracle = run_fit("oracle", {**common, "model.model": str(oracle_policy or policy)}, run_dir=work / "oracle").export_dir
    if oracle_in_bf16:
        store_in_bf16(oracle)
    ensemble = train_ensemble(members=members, out=str(work / "ensemble"), overrides=common)
    scored = scored_files(work)
    for split, path in scored.items():
        with_oracle = path.with_name(f"{split}.oracle.jsonl")
        score([str(oracle)], str(data[split]), str(with_oracle), overwrite=True, **spec.score_options())
        score([str(m) for m in ensemble], str(with_oracle), str(path), output_prefix="ensemble_", overwrite=True,
              **spec.score_options())
    return Judges(oracle, ensemble, scored)


def oracle_accuracy(scored_val: Path) -> float:
    """The Oracle's preference accuracy on the (clean) validation pairs it rescored."""
    return statistics.fmean(row["oracle_chosen"] > row["oracle_rejected"] for _, row in read_rows(str(scored_val)))


def _install(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


# The embedded default's responses are at most ~35 tokens: these budgets never truncate them.
EMBEDDED_SPEC = DataSpec(max_prompt_length=64, max_length=128)


def train_sft(run_dir: Path, base_model: Path, sft_data: Path, val_data: Path, seed: int, spec: DataSpec,
              overrides: dict[str, Any] | None = None) -> Path:
    """The ``sft`` recipe from ``base_model`` on ``sft_data``; returns the export (reused when it exists)."""
    export_dir = run_dir / "export"
    if (export_dir / "config.json").is_file():
        return export_dir
    settings = {"seed_everything": seed, "model.model": str(base_model), "data.train_file": str(sft_data),
                "data.val_file": str(val_data), **spec.fit_overrides(), **(overrides or {})}
    return run_fit("sft", settings, run_dir=run_dir).export_dir


def build_embedded_default(out: str = "embedded_default", work: str = "runs/embedded_default_build", seed: int = 0) -> Path:
    """Rebuild the embedded default (data, base model, SFT policy, Oracle, scored pairs) from scratch.

    The Oracle starts from its own SFT policy, 5.5x the student's size (:data:`demo.ORACLE_SHAPE`),
    and is shipped in bfloat16; the e-DPO ensemble starts from the student's SFT policy.

    Args:
        out: The shipped folder the recipe configs read from.
        work: Scratch folder for raw data, logs and checkpoints of the build.
        seed: Seed of the data generator and of every training run.
    """
    out_dir, work_dir = Path(out), Path(work)
    shutil.rmtree(work_dir, ignore_errors=True)
    raw = demo.write_task(work_dir, seed=seed)
    print(demo.describe_task(work_dir, raw))
    _install(raw["base_model"], out_dir / "base_model")
    for split in ("sft", "eval"):
        _install(raw[split], out_dir / "data" / f"{split}.jsonl")
    sft = train_sft(work_dir / "sft", raw["base_model"], raw["sft"], raw["val"], seed, EMBEDDED_SPEC)
    _install(sft, out_dir / "sft_policy")
    oracle_sft = train_sft(work_dir / "oracle_sft", raw["oracle_base_model"], raw["sft"], raw["val"], seed, EMBEDDED_SPEC)
    judges = train_judges_and_score(work_dir, raw, out_dir / "sft_policy", seed, members=3, spec=EMBEDDED_SPEC,
                                    oracle_policy=oracle_sft, oracle_in_bf16=True)
    _install(judges.oracle, out_dir / "oracle")
    for split, path in judges.scored.items():
        _install(path, out_dir / "data" / f"{split}.jsonl")
    print(f"Oracle: preference accuracy {oracle_accuracy(judges.scored['val']):.3f} on the validation pairs")
    return out_dir


def write_summary(runs: dict[str, FitResult], out: Path) -> str:
    """Write ``summary.csv`` and ``summary.md`` of the final validation metrics; return the table."""
    rows = {name: run.stage_metrics("val") for name, run in runs.items()}
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *SUMMARY_METRICS])
        for name, metrics in rows.items():
            writer.writerow([name, *(metrics.get(k, "") for k in SUMMARY_METRICS)])
    lines = [
        "| method | " + " | ".join(SUMMARY_METRICS) + " |",
        "|---" * (len(SUMMARY_METRICS) + 1) + "|",
        *(
            f"| {name} | " + " | ".join(f"{m[k]:.3f}" if k in m else "-" for k in SUMMARY_METRICS) + " |"
            for name, m in rows.items()
        ),
    ]
    table = "\n".join(lines)
    (out / "summary.md").write_text(
        "Final validation metrics. `implicit_accuracy`: z_w > z_l. `reward_accuracy`: DRDO's reward head "
        "ranks the pair right; for DPO/IPO/e-DPO, their implicit reward beta*(z - z_ref) does.\n\n" + table + "\n"
    )
    return table


def paper_pipeline(
    out: str = "runs/paper",
    sft_data: str = str(EMBEDDED / "data" / "sft.jsonl"),
    train_data: str = str(EMBEDDED / "data" / "train.jsonl"),
    val_data: str = str(EMBEDDED / "data" / "val.jsonl"),
    base_model: str = str(EMBEDDED / "base_model"),
    max_prompt_length: int = 512,
    max_length: int = 1024,
    chat_template: str | None = None,
    students: list[str] = list(STUDENTS),
    members: int = 3,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    eval_data: str | None = None,
    eval_prompts: int | None = None,
    judges: dict[str, str] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> str:
    """The paper's whole pipeline on your data: SFT -> Oracle + ensemble -> score -> students -> report.

    Every stage is a shipped recipe with its data, model, token budgets and folders set from here:
    SFT trains ``base_model`` on ``sft_data`` (prompt and chosen response); the Oracle and the
    ensemble train on ``train_data`` from the SFT policy and score ``train_data`` and ``val_data``;
    the students start from the SFT policy and train on the scored pairs. Writes
    ``<out>/summary.md`` and ``summary.csv``, then samples the SFT policy and every student on the
    evaluation prompts and judges them with the Oracle (and ``judges``): ``<out>/evaluation/``
    holds ``evaluate``'s report, tables and plots. Conversational data is evaluated as
    conversations, through each policy's chat template.

    Args:
        out: Output folder for every stage.
        sft_data, train_data, val_data: Data files in any format the data module reads,
            conversations included (default: the embedded default's).
        base_model: Model to fine-tune first (a local directory or hub id).
        max_prompt_length, max_length: Token budgets of every stage, training, scoring and
            evaluation alike.
        chat_template: A chat template (text or file) for conversational data whose model has none.
        students: Recipes to train as students.
        members: Size of e-DPO's reward-model ensemble.
        seed: Seed of every run and of sampling.
        overrides: Dotted config keys for every training run, e.g. ``{"trainer.max_steps": 50}``.
        eval_data: Prompts to evaluate on (its ``prompt`` column); default: ``val_data``'s.
        eval_prompts: Evaluate on the first ``eval_prompts`` prompts (default: all).
        judges: More judges besides the Oracle: name -> reward-model directory, or ``vader``.
        evaluation: More :func:`evaluation.evaluate` options, e.g. ``{"temperatures": [0.7],
            "max_new_tokens": 128}``.
    """
    require_pretrained(base_model, "base model")
    root = Path(out)
    spec = DataSpec(max_prompt_length, max_length, chat_template)
    data = {"train": Path(train_data), "val": Path(val_data)}
    sft = run_fit("sft", {"seed_everything": seed, "model.model": base_model, "data.train_file": sft_data,
                          "data.val_file": val_data, **spec.fit_overrides(), **(overrides or {})}, run_dir=root / "sft")
    trained_judges = train_judges_and_score(root, data, sft.export_dir, seed, members, spec, overrides)
    runs = {
        name: run_fit(name, {"seed_everything": seed, "model.model": str(sft.export_dir),
                             "data.train_file": str(trained_judges.scored["train"]),
                             "data.val_file": str(trained_judges.scored["val"]),
                             **spec.fit_overrides(), **(overrides or {})}, run_dir=root / name)
        for name in students
    }
    table = write_summary(runs, root)
    print(table)
    evaluate(
        policies={"sft": str(sft.export_dir), **{name: str(run.export_dir) for name, run in runs.items()}},
        judges={"oracle": str(trained_judges.oracle), **(judges or {})},
        prompts=eval_data or val_data, out=str(root / "evaluation"), num_prompts=eval_prompts,
        chat_prompts=_is_conversational(train_data), max_prompt_length=max_prompt_length, max_length=max_length,
        seed=seed, logs={name: str(run.log_dir) for name, run in runs.items() if run.log_dir is not None},
        **(evaluation or {}),
    )
    return table


def _is_conversational(path: str) -> bool:
    """Whether the pairs in ``path`` hold conversations (so its policies expect their chat template)."""
    _, first = next(read_rows(path))
    return isinstance(first.get("chosen"), list)
