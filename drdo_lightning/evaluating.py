"""``python -m drdo_lightning evaluate``: sample, judge, compare with intervals, write the report.

The steps are :mod:`drdo_lightning.evaluation`'s; this command sits above the objectives because a
checkpoint given as a policy is exported first (:func:`drdo_lightning.export.export`).
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

from drdo_lightning.errors import MissingPathError, require_pretrained, shipped_made_by
from drdo_lightning.evaluation.judges import load_judge, require_judge
from drdo_lightning.evaluation.plots import plot_reward_vs_temperature, plot_training_curves, plot_win_matrix
from drdo_lightning.evaluation.report import write_report
from drdo_lightning.evaluation.sampling import PAPER_TEMPERATURES, read_prompts, sample_and_score
from drdo_lightning.evaluation.statistics import divergence, diversity, summarize
from drdo_lightning.export import export
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.reports import write_csv

log = logging.getLogger(__name__)


def _policy_dir(name: str, path: str, out: Path) -> str:
    """An exported directory as is; a Lightning ``.ckpt`` or DeepSpeed checkpoint is exported first."""
    source = Path(path)
    if source.is_file() or (source / "latest").is_file():
        return str(export(path, str(out / "policies" / name)))
    require_pretrained(path, f"policy {name!r}:")
    return path


def _check_shipped_defaults(judges: dict[str, str], prompts: str) -> None:
    """Raise :class:`MissingPathError` naming ``--judges`` or ``--prompts`` when one of them lies in
    a shipped folder that is not here: the command's defaults are the embedded default's Oracle and
    prompts, and a user outside the checkout passes their own rather than build it."""
    for name, spec in judges.items():
        if shipped_made_by(spec) is not None and not Path(spec).exists():
            raise MissingPathError(
                f"judge {name!r} is a default judge, the embedded default's Oracle, which is not in this folder: name "
                "your judges with --judges '{NAME: reward-model directory}' (an Oracle trained with fit --config "
                "oracle, or a public reward model with one label)", path=spec, made_by=f"or {shipped_made_by(spec)}")
    if shipped_made_by(prompts) is not None and not Path(prompts).exists():
        raise MissingPathError(
            "the default prompts are the embedded default's held-out prompts, which are not in this folder: name "
            "your evaluation prompts with --prompts FILE (one prompt per row, column --prompt_column)", path=prompts,
            made_by=f"or {shipped_made_by(prompts)}")


def warn_identical_policies(records: list[dict]) -> list[tuple[str, str]]:
    """The pairs of policies that gave the same response to every prompt at every temperature, each
    warned of: every comparison between them is a tie, so their win rate (0.5) says nothing of
    them but that they generate alike (the same weights, or an export from before training moved them)."""
    answers: dict[str, list[str]] = {}
    for r in records:
        answers.setdefault(r["policy"], []).append(r["response"])
    same = [(a, b) for a, b in itertools.combinations(answers, 2) if answers[a] == answers[b]]
    for a, b in same:
        log.warning("policies %r and %r gave the same response in all %d generations (every prompt and temperature): "
                    "every comparison between them is a tie; do they hold the same weights?", a, b, len(answers[a]))
    return same


def _reference_dir(reference: str | None, policy_dirs: dict[str, str]) -> str | None:
    """The model KL is measured to: one of the policies by name, or a directory; None to skip."""
    if reference is None:
        return None
    if reference in policy_dirs:
        return policy_dirs[reference]
    if Path(reference).is_dir():
        return reference
    log.warning("kl_reference %r is neither one of the policies %s nor a directory: no KL reported",
                reference, list(policy_dirs))
    return None


def evaluate(
    policies: dict[str, str],
    judges: dict[str, str],
    prompts: str,
    out: str = "runs/evaluate",
    prompt_column: str = "prompt",
    num_prompts: int | None = None,
    chat_prompts: bool = False,
    temperatures: list[float] = list(PAPER_TEMPERATURES),
    top_p: float = 0.8,
    max_new_tokens: int = 256,
    max_prompt_length: int = 512,
    max_length: int = 1024,
    batch_size: int = 32,
    seed: int = 0,
    baseline: str | None = "sft",
    bootstrap_samples: int = 1000,
    logs: dict[str, str] | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    kl_reference: str | None = "sft",
) -> list[dict]:
    """Sample from every policy, score with every judge, and write win rates, rewards, plots and a report.

    Writes under ``out``: ``generations.jsonl`` (one record per policy, temperature and
    prompt, with every judge's reward, and with ``kl_reference`` the log-probs ``logp`` and
    ``reference_logp``), ``results.csv`` / ``results.json`` (every estimate with its 95% interval;
    see :func:`summarize`, :func:`diversity`, :func:`divergence`), ``win_rate_<judge>.png``,
    ``reward_vs_temperature.png``, ``training_curves.png`` (with ``logs``) and ``report.md``.

    Args:
        policies: Name -> exported directory (or hub id, or a training checkpoint, exported first).
        judges: Name -> reward-model directory (with ``reward_head.safetensors``), or a registered
            judge's name (``vader``: the embedded default's gold reward).
        prompts: Evaluation prompts: any file the data module reads, one prompt per row, as text
            or as a conversation (a list of messages), which each policy's chat template renders.
        num_prompts: Use the first ``num_prompts`` prompts (default: all).
        chat_prompts: Read text prompts as one user turn of a conversation (policies trained on
            conversations expect their chat template).
        temperatures: Sampling temperatures (paper: 0.2, 0.5, 0.7, 0.9); 0 decodes greedily.
        top_p: Nucleus sampling threshold (paper: 0.8).
        max_new_tokens: Response length cap (paper: 256).
        max_prompt_length, max_length: Truncation for sampling and for the reward-model judges,
            as in training.
        seed: Sampling and bootstrap seed; the same seed gives the same generations.
        baseline: Policy the reward advantage and the head-to-head win rates of the report are
            measured against, e.g. ``dpo`` (skipped when absent). Every pair's win rate is in the
            results either way.
        bootstrap_samples: Bootstrap resamples per interval.
        logs: Name -> run directory or ``metrics.csv`` of training runs, for the training curves.
        device: ``cpu`` or ``cuda``.
        kl_reference: KL(policy || reference) of every policy on its own samples, per temperature
            (statistic ``kl``, next to ``distinct_2``; temperature-1 log-probs, see
            :mod:`evaluation.divergence`): the name of one of ``policies`` (default ``sft``, the
            starting policy) or a model directory. Skipped with a warning when it is neither;
            ``None`` skips it.
    """
    _check_shipped_defaults(judges, prompts)
    for name, spec in judges.items():
        require_judge(name, spec)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt_list = read_prompts(prompts, prompt_column, num_prompts, as_chat=chat_prompts)
    policy_dirs = {name: _policy_dir(name, path, out_dir) for name, path in policies.items()}
    reference_dir = _reference_dir(kl_reference, policy_dirs)
    judge_fns = {
        name: load_judge(spec, batch_size=batch_size, max_prompt_length=max_prompt_length, max_length=max_length,
                         device=device, trust_remote_code=trust_remote_code)
        for name, spec in judges.items()
    }
    records, scores = sample_and_score(
        policy_dirs, prompt_list, judge_fns, temperatures=temperatures, top_p=top_p, max_new_tokens=max_new_tokens,
        max_prompt_length=max_prompt_length, batch_size=batch_size, seed=seed, device=device,
        trust_remote_code=trust_remote_code, kl_reference=reference_dir,
    )
    warn_identical_policies(records)
    if baseline is not None and baseline not in policies:
        log.warning("baseline %r is not among the policies %s: no reward advantage reported", baseline, list(policies))
    rows = summarize(scores, temperatures, baseline=baseline, samples=bootstrap_samples, seed=seed)
    rows += diversity(records, temperatures)
    if reference_dir is not None:
        rows += divergence(records, temperatures, kl_reference, samples=bootstrap_samples, seed=seed)

    write_jsonl(out_dir / "generations.jsonl", records)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    write_csv(rows, out_dir / "results.csv")
    names = list(policies)
    plots = {f"win_{j}": plot_win_matrix(rows, j, names, out_dir / f"win_rate_{j}.png") for j in judges}
    plots["temperature"] = plot_reward_vs_temperature(rows, list(judges), names, temperatures,
                                                      out_dir / "reward_vs_temperature.png")
    if logs:
        plots["training"] = plot_training_curves(logs, out_dir / "training_curves.png")
    settings = {"policies": names, "judges": list(judges), "prompts": prompts, "num_prompts": len(prompt_list),
                "temperatures": list(temperatures), "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                "baseline": baseline, "bootstrap_samples": bootstrap_samples,
                "kl_reference": kl_reference if reference_dir is not None else None}
    report = write_report(rows, settings, plots, out_dir)
    print(f"Wrote {len(records)} generations and {len(rows)} estimates; report: {report}")
    return rows
