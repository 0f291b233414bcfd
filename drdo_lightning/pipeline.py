"""Multi-stage runs chained from the recipe configs: the same commands a user runs.

- ``train-ensemble``: K reward models that differ only in their reward head's initialisation.
- ``paper-pipeline``: SFT -> Oracle (+ ensemble) -> score -> DRDO, DPO, IPO, e-DPO students ->
  a summary table of their validation metrics, all under one output folder.
- ``build-embedded-default``: regenerate ``embedded_default/`` from scratch.

Run them from the repository root: the recipes' data paths are relative to it.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from drdo_lightning import demo
from drdo_lightning.scoring import score

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EMBEDDED = Path("embedded_default")
EMBEDDED_LENGTHS = {"max_prompt_length": 64, "max_length": 128}
STUDENTS = ("drdo", "dpo", "ipo", "edpo")
SUMMARY_METRICS = ("loss", "implicit_accuracy", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")


def _config(recipe: str | Path) -> Path:
    """A recipe name (``dpo``) or a path to a YAML file."""
    path = Path(recipe)
    return path if path.suffix in (".yaml", ".yml") else CONFIG_DIR / f"{recipe}.yaml"


def fit_recipe(recipe: str | Path, root: Path, *overrides: str) -> Path:
    """Run ``fit`` on a recipe with every output under ``root``; return the export directory."""
    from drdo_lightning.cli import main  # deferred: cli imports this module

    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True}},
        {"class_path": "drdo_lightning.ExportHuggingFace", "init_args": {"dirpath": str(root / "export")}},
    ]
    main(
        [
            "fit",
            "--config", str(_config(recipe)),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.callbacks", json.dumps(callbacks),
            *overrides,
        ]
    )
    return root / "export"


def train_ensemble(
    config: str = "reward_model", members: int = 3, out: str = "runs/reward_ensemble", overrides: list[str] | None = None
) -> list[Path]:
    """Train ``members`` reward models (paper Eq. 2) that differ only in the reward head's init.

    Member ``k`` runs the recipe with ``--model.reward_head_seed k``; data order and every
    other setting are shared. Exports land in ``<out>/member_<k>/export``.

    Args:
        config: Recipe name or YAML path (default: configs/reward_model.yaml).
        members: Ensemble size (paper: 3).
        out: Output folder.
        overrides: Extra command-line options for every member (e.g. ``["--model.model", "path"]``).
    """
    return [
        fit_recipe(config, Path(out) / f"member_{k}", "--model.reward_head_seed", str(k), *(overrides or []))
        for k in range(members)
    ]


def _install(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def _train_judges_and_score(
    work: Path, data: dict[str, Path], policy: Path, seed: int, members: int, overrides: tuple[str, ...] = ()
) -> tuple[Path, list[Path], dict[str, Path]]:
    """Oracle (Eq. 5) and reward-model ensemble (Eq. 2) from ``policy``, then score train/val.

    ``overrides`` are extra options for every judge's training run (e.g. a label-flip rate).
    Returns the Oracle, the ensemble members and the scored files, which carry
    ``oracle_{chosen,rejected}`` (numbers) and ``ensemble_{chosen,rejected}`` (lists).
    """
    common = ("--seed_everything", str(seed), "--model.model", str(policy),
              "--data.train_file", str(data["train"]), "--data.val_file", str(data["val"]), *overrides)
    oracle = fit_recipe("oracle", work / "oracle", *common)
    ensemble = train_ensemble(members=members, out=str(work / "ensemble"), overrides=list(common))
    scored = {}
    for split in ("train", "val"):
        with_oracle = work / "data" / f"{split}.oracle.jsonl"
        scored[split] = work / "data" / f"{split}.scored.jsonl"
        score([str(oracle)], str(data[split]), str(with_oracle), overwrite=True, **EMBEDDED_LENGTHS)
        score([str(m) for m in ensemble], str(with_oracle), str(scored[split]), output_prefix="ensemble_",
              overwrite=True, **EMBEDDED_LENGTHS)
    return oracle, ensemble, scored


def build_embedded_default(out: str = "embedded_default", work: str = "runs/embedded_default_build", seed: int = 0) -> Path:
    """Rebuild the embedded default: data, base model, SFT policy, Oracle, scored pairs.

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
    sft = fit_recipe("sft", work_dir / "sft", "--seed_everything", str(seed), "--data.val_file", str(raw["val"]))
    _install(sft, out_dir / "sft_policy")
    oracle, _, scored = _train_judges_and_score(work_dir, raw, out_dir / "sft_policy", seed, members=3)
    _install(oracle, out_dir / "oracle")
    for split, path in scored.items():
        _install(path, out_dir / "data" / f"{split}.jsonl")
    return out_dir


def _final_val_metrics(root: Path) -> dict[str, float]:
    """The last logged value of every ``val/`` metric of a run."""
    (metrics_file,) = root.glob("logs/version_*/metrics.csv")
    last: dict[str, float] = {}
    with metrics_file.open() as f:
        for row in csv.DictReader(f):
            last.update({k[4:]: float(v) for k, v in row.items() if k.startswith("val/") and v})
    return last


def write_summary(runs: dict[str, Path], out: Path) -> str:
    """Write ``summary.csv`` and ``summary.md`` of the final validation metrics; return the table."""
    rows = {name: _final_val_metrics(root) for name, root in runs.items()}
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
    students: list[str] = list(STUDENTS),
    members: int = 3,
    seed: int = 0,
    overrides: list[str] | None = None,
) -> str:
    """The paper's whole pipeline: SFT -> Oracle + ensemble -> score -> students -> summary.

    Every stage is a recipe under ``configs/`` with its paths pointed into ``out``; students
    start from the SFT policy trained here. Writes ``<out>/summary.md`` and ``summary.csv``.

    Args:
        out: Output folder for every stage.
        sft_data, train_data, val_data: Data files (default: the embedded default's).
        base_model: Model to fine-tune first.
        students: Recipes to train as students.
        members: Size of e-DPO's reward-model ensemble.
        seed: Seed of every run.
        overrides: Extra options for every student (e.g. ``["--trainer.max_steps", "50"]``).
    """
    root = Path(out)
    data = {"train": Path(train_data), "val": Path(val_data)}
    sft = fit_recipe("sft", root / "sft", "--seed_everything", str(seed), "--model.model", base_model,
                     "--data.train_file", sft_data, "--data.val_file", val_data)
    _, _, scored = _train_judges_and_score(root, data, sft, seed, members)
    runs = {}
    for name in students:
        runs[name] = root / name
        fit_recipe(name, runs[name], "--seed_everything", str(seed), "--model.model", str(sft),
                   "--data.train_file", str(scored["train"]), "--data.val_file", str(scored["val"]), *(overrides or []))
    table = write_summary(runs, root)
    print(table)
    return table
