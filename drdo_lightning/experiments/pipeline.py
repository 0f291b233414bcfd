"""``paper-pipeline``: SFT -> Oracle (+ ensemble) -> score -> students -> summary -> ``evaluate``'s report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from drdo_lightning.data.pairs import holds_conversations
from drdo_lightning.embedded_default import EMBEDDED
from drdo_lightning.errors import require_pretrained
from drdo_lightning.evaluating import evaluate
from drdo_lightning.experiments.sweeps import STUDENTS
from drdo_lightning.reports import markdown_table, write_csv
from drdo_lightning.stages import train_judges_and_score
from drdo_lightning.training import DataSpec, FitResult, RunSpec, run_fit

SUMMARY_METRICS = ("loss", "implicit_accuracy", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")



def write_summary(runs: dict[str, FitResult], out: Path) -> str:
    """Write ``summary.csv`` and ``summary.md`` of the final validation metrics; return the table."""
    rows = {name: run.stage_metrics("val") for name, run in runs.items()}
    write_csv([{"method": name, **{k: m.get(k, "") for k in SUMMARY_METRICS}} for name, m in rows.items()],
              out / "summary.csv")
    table = markdown_table(["method", *SUMMARY_METRICS],
                           [[name, *(f"{m[k]:.3f}" if k in m else "-" for k in SUMMARY_METRICS)] for name, m in rows.items()])
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
        evaluation: More :func:`evaluating.evaluate` options, e.g. ``{"temperatures": [0.7],
            "max_new_tokens": 128}``.
    """
    require_pretrained(base_model, "base model")
    root = Path(out)
    spec = DataSpec(max_prompt_length, max_length, chat_template)
    data = {"train": Path(train_data), "val": Path(val_data)}
    shared = RunSpec("sft", data=spec, seed=seed, overrides=overrides or {})
    sft = run_fit(replace(shared, run_dir=root / "sft", model=base_model, train_file=sft_data, val_file=val_data))
    trained_judges = train_judges_and_score(root, data, sft.export_dir, members, shared)
    runs = {
        name: run_fit(replace(shared, recipe=name, run_dir=root / name, model=sft.export_dir,
                              train_file=trained_judges.scored["train"], val_file=trained_judges.scored["val"]))
        for name in students
    }
    table = write_summary(runs, root)
    print(table)
    evaluate(
        policies={"sft": str(sft.export_dir), **{name: str(run.export_dir) for name, run in runs.items()}},
        judges={"oracle": str(trained_judges.oracle), **(judges or {})},
        prompts=eval_data or val_data, out=str(root / "evaluation"), num_prompts=eval_prompts,
        chat_prompts=holds_conversations(train_data), max_prompt_length=max_prompt_length, max_length=max_length,
        seed=seed, logs={name: str(run.log_dir) for name, run in runs.items() if run.log_dir is not None},
        **(evaluation or {}),
    )
    return table
