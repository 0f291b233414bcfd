"""``build-embedded-default``: regenerate ``embedded_default/`` from scratch."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from drdo_lightning.embedded_default import task
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.stages import oracle_accuracy, train_judges_and_score, train_sft
from drdo_lightning.training import DataSpec, RunSpec


def _install(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


# The embedded default's responses are at most ~35 tokens: these budgets never truncate them.
EMBEDDED_SPEC = DataSpec(max_prompt_length=64, max_length=128)


def write_ood_prompts(out: str = "embedded_default", seed: int = 0, n: int = 200) -> Path:
    """Write ``out/data/eval_ood.jsonl``: the out-of-distribution evaluation prompts of
    :func:`task.generate_ood_prompts`. Nothing else of the build depends on them, so this alone
    refreshes them in an existing build."""
    return write_jsonl(Path(out) / "data" / "eval_ood.jsonl", task.generate_ood_prompts(seed, n))


def build_embedded_default(out: str = "embedded_default", work: str = "runs/embedded_default_build", seed: int = 0) -> Path:
    """Rebuild the embedded default (data, base model, SFT policy, Oracle, scored pairs) from scratch.

    The data are ``data/{sft,train,val,eval}.jsonl`` and the out-of-distribution evaluation prompts
    ``data/eval_ood.jsonl`` (:func:`write_ood_prompts`).

    The Oracle starts from its own SFT policy, 5.5x the student's size (:data:`task.ORACLE_SHAPE`),
    and is shipped in bfloat16; the e-DPO ensemble starts from the student's SFT policy.

    Args:
        out: The shipped folder the recipe configs read from.
        work: Scratch folder for raw data, logs and checkpoints of the build.
        seed: Seed of the data generator and of every training run.
    """
    out_dir, work_dir = Path(out), Path(work)
    shutil.rmtree(work_dir, ignore_errors=True)
    raw = task.write_task(work_dir, seed=seed)
    print(task.describe_task(work_dir, raw))
    _install(raw["base_model"], out_dir / "base_model")
    for split in ("sft", "eval"):
        _install(raw[split], out_dir / "data" / f"{split}.jsonl")
    write_ood_prompts(out, seed)
    sft_run = RunSpec("sft", train_file=raw["sft"], val_file=raw["val"], data=EMBEDDED_SPEC, seed=seed)
    sft = train_sft(replace(sft_run, run_dir=work_dir / "sft", model=raw["base_model"]))
    _install(sft, out_dir / "sft_policy")
    oracle_sft = train_sft(replace(sft_run, run_dir=work_dir / "oracle_sft", model=raw["oracle_base_model"]))
    judges = train_judges_and_score(work_dir, raw, out_dir / "sft_policy", 3, RunSpec("oracle", data=EMBEDDED_SPEC, seed=seed),
                                    oracle_policy=oracle_sft, oracle_in_bf16=True)
    _install(judges.oracle, out_dir / "oracle")
    for split, path in judges.scored.items():
        _install(path, out_dir / "data" / f"{split}.jsonl")
    print(f"Oracle: preference accuracy {oracle_accuracy(judges.scored['val']):.3f} on the validation pairs")
    return out_dir
