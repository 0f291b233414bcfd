"""``python -m drdo_lightning evaluate``: sample from policies, score with judges, compare with intervals.

The protocol is the paper's (``docs/evaluation.md``), with the confidence intervals it lacks:

1. **Sample** one response per prompt from every policy with nucleus sampling (top-p 0.8) at
   each temperature (0.2, 0.5, 0.7, 0.9): seeded, batched with left padding.
2. **Score** each (prompt, response) with every judge: a reward model (the Oracle, or any
   directory with ``reward_head.safetensors``, via :meth:`CausalLMWithRewardHead.rewards`) or
   ``vader``, the embedded default's gold reward (:func:`demo.gold_reward` of the response).
3. **Compare**: policy A *wins* over B on a prompt and temperature when r(x, y_A) > r(x, y_B);
   ties are counted apart. Win rates, mean rewards and the reward advantage over a baseline
   policy (SFT) get 95% percentile-bootstrap intervals that resample prompts.
4. **Write** the generations (JSONL), every estimate (CSV and JSON), PNG plots and a markdown
   report that embeds them.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from drdo_lightning import demo
from drdo_lightning.data import Columns, RowError, TextPair, check_messages, load_tokenizer, read_rows, truncate_prompt
from drdo_lightning.errors import DataError, require_pretrained
from drdo_lightning.export import export
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.scoring import load_scorer, require_reward_model, reward_columns, tokenized_for

log = logging.getLogger(__name__)

GOLD = "vader"  # judge spec of the embedded default's gold reward
PAPER_TEMPERATURES = (0.2, 0.5, 0.7, 0.9)
DEFAULT_JUDGES = {"oracle": "embedded_default/oracle", "gold": GOLD}
ALL = "all"  # the "temperature" of estimates pooled over every temperature

Prompt = str | list[dict]  # text, or a conversation that the policy's chat template renders
# Judge: (prompts, responses) -> one reward per pair.
Judge = Callable[[Sequence[Prompt], Sequence[str]], list[float]]
# judge name -> policy name -> rewards [prompts, temperatures]
Scores = dict[str, dict[str, np.ndarray]]


class Estimate(NamedTuple):
    value: float
    low: float
    high: float


# ---------------------------------------------------------------------------------------
# Sampling


def _encode_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int, prefix: int) -> list[int]:
    """Prompt ids as in training (:func:`data.tokenize_pairs`), truncated by :func:`data.truncate_prompt`:
    text gets the tokenizer's ``prefix`` special tokens (BOS); a conversation is rendered with the chat
    template and its generation prompt, which writes its own special tokens."""
    if isinstance(prompt, str):
        return truncate_prompt(tokenizer(prompt)["input_ids"], max_prompt_length, prefix)
    if not tokenizer.chat_template:
        raise DataError(f"a prompt is a conversation, and the policy {tokenizer.name_or_path} has no chat template to render it")
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return truncate_prompt(tokenizer(text, add_special_tokens=False)["input_ids"], max_prompt_length, 0)


@torch.inference_mode()
def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    temperature: float,
    top_p: float = 0.8,
    max_new_tokens: int = 256,
    max_prompt_length: int = 512,
    batch_size: int = 32,
    seed: int = 0,
    progress: tqdm | None = None,
) -> list[str]:
    """One sampled response per prompt (text after the prompt, special tokens removed).

    Batches are left-padded so every row continues from its last prompt token. Batch ``b`` is
    sampled right after ``torch.manual_seed(seed + b)`` inside a forked RNG: the same seed,
    prompts and batch size give the same responses whatever ran before, and the caller's RNG
    state is untouched. ``temperature=0`` decodes greedily.
    """
    device = next(model.parameters()).device
    prefix = len(tokenizer("")["input_ids"])
    encoded = [_encode_prompt(p, tokenizer, max_prompt_length, prefix) for p in prompts]
    # Nucleus sampling only, as in the paper: top_k=0 switches off a top-k cut a model's generation config may carry.
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    if temperature == 0:
        sampling = {"do_sample": False}
    responses: list[str] = []
    for b, start in enumerate(range(0, len(encoded), batch_size)):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + b)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        responses += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        if progress is not None:
            progress.update(1)
    return responses


def load_policy(path: str, *, device: str = "cpu", trust_remote_code: bool = False):
    """A causal LM and its tokenizer from an exported directory or hub id."""
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code).to(device).eval()
    return model, load_tokenizer(path, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------
# Judges


class RewardModelJudge:
    """Rewards from a reward model (an Oracle trained here or a one-label sequence classifier),
    tokenized exactly as ``score`` tokenizes for it.

    Each distinct (prompt, response) is scored once, so identical responses get identical
    rewards (a tie), whatever batch they land in.
    """

    def __init__(self, path: str, *, batch_size: int = 32, max_prompt_length: int = 512, max_length: int = 1024,
                 device: str = "cpu", trust_remote_code: bool = False) -> None:
        require_reward_model(path, "judge")
        self.model, self.tokenizer = load_scorer(path, device=device, trust_remote_code=trust_remote_code)
        self.batch_size, self.max_prompt_length, self.max_length = batch_size, max_prompt_length, max_length
        self.name = path

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        keys = [(json.dumps(p), r) for p, r in zip(prompts, responses)]  # conversations are lists: not hashable
        unique = dict(zip(keys, zip(prompts, responses)))
        pairs = [TextPair(p, r, None, None, None, prompt_has_special_tokens=False) for p, r in unique.values()]
        examples = tokenized_for(self.model, self.tokenizer, pairs, Columns("prompt", "response", None),
                                 max_prompt_length=self.max_prompt_length, max_length=self.max_length)
        rewards = reward_columns(self.model, examples, self.tokenizer.pad_token_id, batch_size=self.batch_size,
                                 sides=("chosen",), desc=f"judge {self.name}")["chosen"]
        by_key = dict(zip(unique, rewards))
        return [by_key[k] for k in keys]


def gold_judge(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
    """The embedded default's gold reward: VADER compound sentiment of the response alone."""
    return demo.gold_reward(responses)


def require_judge(name: str, spec: str) -> None:
    """Raise a :class:`~drdo_lightning.errors.UserError` unless ``spec`` is ``vader`` or a trained reward model."""
    if spec != GOLD:
        require_reward_model(spec, f"judge {name!r}:")


def load_judge(spec: str, **kwargs) -> Judge:
    """``vader`` (the gold reward) or a reward-model directory (``kwargs`` go to :class:`RewardModelJudge`)."""
    return gold_judge if spec == GOLD else RewardModelJudge(spec, **kwargs)


# ---------------------------------------------------------------------------------------
# Sampling and scoring every policy


def read_prompts(path: str, column: str = "prompt", limit: int | None = None, *, as_chat: bool = False) -> list[Prompt]:
    """Prompts from any file :func:`data.read_rows` reads, the first ``limit``: text, or conversations
    (lists of messages, ending in a turn the policy answers) that the policy's chat template renders.
    ``as_chat`` reads a text prompt as a conversation of one user turn (for chat-trained policies)."""
    prompts: list[Prompt] = []
    for number, row in read_rows(path):
        value = row.get(column)
        try:
            if isinstance(value, list):
                prompts.append(check_messages(value, column))
                if value[-1]["role"] == "assistant":
                    raise RowError(column, "bad_roles", "a conversation to answer must not end with an assistant turn")
            elif isinstance(value, str) and value.strip():
                prompts.append([{"role": "user", "content": value}] if as_chat else value)
            else:
                raise RowError(column, "bad_prompt", f"expected a non-empty string or a list of messages, got {value!r:.60}")
        except RowError as e:
            missing = {"setting": "prompt_column", "advice": "name the prompt column with {option}"} if value is None else {}
            raise DataError(f"{path}: row {number}: {column!r}: {e}", **missing) from None
        if limit is not None and len(prompts) == limit:
            break
    return prompts


def sample_and_score(
    policies: dict[str, str],
    prompts: Sequence[Prompt],
    judges: dict[str, Judge],
    *,
    temperatures: Sequence[float] = PAPER_TEMPERATURES,
    top_p: float = 0.8,
    max_new_tokens: int = 256,
    max_prompt_length: int = 512,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[list[dict], Scores]:
    """Sample every policy at every temperature and score every response with every judge.

    Every policy gets the same seeds at a given temperature (common random numbers), which
    lowers the variance of paired comparisons. Returns the generation records and
    ``scores[judge][policy]``, an array ``[len(prompts), len(temperatures)]``.
    """
    n_batches = -(-len(prompts) // batch_size)
    records: list[dict] = []
    scores: Scores = {judge: {} for judge in judges}
    with tqdm(total=len(policies) * len(temperatures) * n_batches, desc="sampling", unit="batch") as progress:
        for name, path in policies.items():
            model, tokenizer = load_policy(path, device=device, trust_remote_code=trust_remote_code)
            responses = [
                generate(model, tokenizer, prompts, temperature=t, top_p=top_p, max_new_tokens=max_new_tokens,
                         max_prompt_length=max_prompt_length, batch_size=batch_size, seed=seed, progress=progress)
                for t in temperatures
            ]
            flat_prompts = [p for _ in temperatures for p in prompts]
            flat_responses = [r for per_t in responses for r in per_t]
            rewards = {}
            for judge, score in judges.items():
                rewards[judge] = np.asarray(score(flat_prompts, flat_responses), dtype=float)
                scores[judge][name] = rewards[judge].reshape(len(temperatures), len(prompts)).T
            for k, (t, i) in enumerate(itertools.product(temperatures, range(len(prompts)))):
                records.append({"policy": name, "temperature": t, "prompt_index": i, "prompt": prompts[i],
                                "response": flat_responses[k], "rewards": {j: float(r[k]) for j, r in rewards.items()}})
    return records, scores


# ---------------------------------------------------------------------------------------
# Statistics


def bootstrap_mean(values: Sequence[float], *, samples: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of per-prompt values with a percentile-bootstrap interval (prompts resampled with replacement).

    With one prompt, or equal values, the interval collapses to the mean.
    """
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(values.mean()), float(low), float(high))


def compare(a: np.ndarray, b: np.ndarray, **bootstrap) -> dict[str, Estimate]:
    """Win, tie and loss rates of policy A over B from rewards ``[prompts, temperatures]``.

    ``win`` = P(r_A > r_B), ``tie`` = P(r_A = r_B), ``loss`` = P(r_A < r_B), over the cells of
    the same prompt and temperature. ``win_rate`` = win + tie / 2 (a tie counts half, so two
    identical policies score 50%). Intervals resample prompts, keeping each prompt's
    temperatures together.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    win, tie = (a > b).mean(axis=1), (a == b).mean(axis=1)
    return {
        "win": bootstrap_mean(win, **bootstrap),
        "tie": bootstrap_mean(tie, **bootstrap),
        "loss": bootstrap_mean(1.0 - win - tie, **bootstrap),
        "win_rate": bootstrap_mean(win + tie / 2, **bootstrap),
    }


def summarize(scores: Scores, temperatures: Sequence[float], *, baseline: str | None = None, **bootstrap) -> list[dict]:
    """Every estimate as a flat row: ``judge, policy, opponent, temperature, statistic, value, low, high``.

    Statistics, per judge and per temperature (and pooled over all, ``temperature="all"``):
    ``mean_reward``; ``advantage`` = mean of r(policy) - r(baseline) on the same prompts (when
    ``baseline`` is one of the policies); ``win``/``tie``/``loss``/``win_rate`` of every
    policy against every other (:func:`compare`).
    """
    columns = [(str(t), [i]) for i, t in enumerate(temperatures)] + [(ALL, list(range(len(temperatures))))]
    rows = []

    def add(judge, policy, opponent, temperature, statistic, estimate: Estimate) -> None:
        rows.append({"judge": judge, "policy": policy, "opponent": opponent, "temperature": temperature,
                     "statistic": statistic, **estimate._asdict()})

    for judge, by_policy in scores.items():
        for temperature, cols in columns:
            for name, rewards in by_policy.items():
                add(judge, name, "", temperature, "mean_reward", bootstrap_mean(rewards[:, cols].mean(1), **bootstrap))
                if baseline in by_policy and name != baseline:
                    gap = (rewards - by_policy[baseline])[:, cols].mean(1)
                    add(judge, name, baseline, temperature, "advantage", bootstrap_mean(gap, **bootstrap))
                for other, other_rewards in by_policy.items():
                    if other != name:
                        for statistic, estimate in compare(rewards[:, cols], other_rewards[:, cols], **bootstrap).items():
                            add(judge, name, other, temperature, statistic, estimate)
    return rows


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all word n-grams of ``texts``, pooled.

    1.0 when no n-gram repeats; a policy that answers every prompt with the same sentence scores
    near 1/len(texts). Texts shorter than ``n`` words add nothing; with no n-gram at all it is 0.
    """
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity(records: list[dict], temperatures: Sequence[float]) -> list[dict]:
    """Distinct-2 of each policy's generations per temperature, and its mean over temperatures (``all``).

    Rows have :func:`summarize`'s columns with ``statistic="distinct_2"``, no judge and no interval.
    """
    texts: dict[tuple[str, float], list[str]] = defaultdict(list)
    for r in records:
        texts[r["policy"], r["temperature"]].append(r["response"])
    rows = []
    for policy in dict.fromkeys(r["policy"] for r in records):
        values = [distinct_n(texts[policy, t]) for t in temperatures]
        for temperature, value in [*zip(map(str, temperatures), values), (ALL, float(np.mean(values)))]:
            rows.append({"judge": "", "policy": policy, "opponent": "", "temperature": temperature,
                         "statistic": "distinct_2", "value": value, "low": None, "high": None})
    return rows


def _lookup(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in where.items())), None)


# ---------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no global backend switch, so notebooks keep theirs)


def new_figure(**kwargs):
    from matplotlib.figure import Figure  # an optional dependency, needed only for plots

    return Figure(**kwargs)


def plot_win_matrix(rows: list[dict], judge: str, policies: Sequence[str], path: Path) -> Path:
    """Heat map of win rates (ties count half), row policy vs column opponent, over all temperatures."""
    n = len(policies)
    fig = new_figure(figsize=(1.6 + 1.3 * n, 1.2 + 1.1 * n), layout="constrained")
    ax = fig.add_subplot()
    matrix = np.full((n, n), np.nan)
    for i, a in enumerate(policies):
        for j, b in enumerate(policies):
            row = _lookup(rows, judge=judge, policy=a, opponent=b, temperature=ALL, statistic="win_rate")
            if row is None:
                continue
            matrix[i, j] = row["value"]
            ax.text(j, i, f"{row['value']:.0%}\n[{row['low']:.0%}, {row['high']:.0%}]", ha="center", va="center", fontsize=8)
    image = ax.imshow(matrix, cmap="RdBu", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), policies, rotation=30, ha="right")
    ax.set_yticks(range(n), policies)
    ax.set_xlabel("opponent")
    ax.set_title(f"win rate of row over column ({judge} judge)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110)
    return path


def plot_reward_vs_temperature(rows: list[dict], judges: Sequence[str], policies: Sequence[str],
                               temperatures: Sequence[float], path: Path) -> Path:
    """Mean reward with its 95% interval against the sampling temperature, one panel per judge."""
    fig = new_figure(figsize=(4.5 * len(judges), 3.6), layout="constrained")
    axes = fig.subplots(1, len(judges), squeeze=False)[0]
    for ax, judge in zip(axes, judges):
        for k, policy in enumerate(policies):
            points = [_lookup(rows, judge=judge, policy=policy, temperature=str(t), statistic="mean_reward")
                      for t in temperatures]
            x = np.asarray(temperatures) + (k - (len(policies) - 1) / 2) * 0.006  # dodge overlapping bars
            y = np.array([p["value"] for p in points])
            err = np.array([[p["value"] - p["low"] for p in points], [p["high"] - p["value"] for p in points]])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=policy)
        ax.set_xlabel("temperature")
        ax.set_ylabel(f"mean {judge} reward")
        ax.set_title(judge)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


CURVES = {
    "implicit_accuracy": "implicit preference accuracy (z_w > z_l)",
    "reward_accuracy": "reward accuracy",
    "reward_margin": "reward margin (chosen - rejected)",
    "chosen_logps": "log pi(y_w|x)",
    "rejected_logps": "log pi(y_l|x)",
}


def read_training_log(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``train/*`` series of a CSVLogger ``metrics.csv``: ``{metric: (steps, values)}``.

    ``path`` is the file or a run directory; in a directory the newest ``metrics.csv`` is read.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no metrics.csv under {path}")
        path = found[-1]
    series: dict[str, tuple[list[int], list[float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("train/") and value:
                    steps, values = series.setdefault(key[len("train/"):], ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return series


def plot_training_curves(logs: dict[str, str], path: Path) -> Path:
    """Training curves per run, as the paper's Fig. 4: preference accuracies, reward margin, and the
    chosen and rejected log-probabilities per step. A metric a run does not log is left out."""
    runs = {name: read_training_log(log_path) for name, log_path in logs.items()}
    fig = new_figure(figsize=(12, 6.4), layout="constrained")
    axes = fig.subplots(2, 3).flat
    for ax, (metric, title) in zip(axes, CURVES.items()):
        for k, (name, series) in enumerate(runs.items()):
            if metric in series:
                ax.plot(*series[metric], color=f"C{k}", label=name)  # one colour per run in every panel
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    legend = fig.axes[-1]  # the sixth panel holds the legend
    legend.axis("off")
    legend.legend(*fig.axes[0].get_legend_handles_labels(), loc="center")
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------
# Writing results


def _fmt(row: dict | None, percent: bool) -> str:
    if row is None:
        return "-"
    if percent:
        return f"{row['value']:.0%} [{row['low']:.0%}, {row['high']:.0%}]"
    return f"{row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def _table(header: Sequence[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def _matrix(rows: list[dict], judge: str, policies: Sequence[str], statistic: str, cell: Callable[[dict], str]) -> str:
    """Markdown table of a pairwise statistic (all temperatures): row policy against column opponent."""
    body = [[a] + ["" if a == b else cell(_lookup(rows, judge=judge, policy=a, opponent=b, temperature=ALL, statistic=statistic))
                   for b in policies] for a in policies]
    return _table(["policy", *policies], body)


def _by_temperature(rows: list[dict], judge: str, policies: Sequence[str], statistic: str, columns: list[str]) -> str:
    """Markdown table of a per-policy statistic, one column per temperature."""
    body = [[p] + [_fmt(_lookup(rows, judge=judge, policy=p, temperature=t, statistic=statistic), False) for t in columns]
            for p in policies]
    return _table(["policy", *columns], body)


def write_report(rows: list[dict], settings: dict, plots: dict[str, Path], out: Path) -> Path:
    """``report.md``: the settings, then per judge the win-rate matrix, ties, mean rewards and the
    advantage over the baseline, with every plot embedded."""
    policies, judges, baseline = settings["policies"], settings["judges"], settings["baseline"]
    columns = [str(t) for t in settings["temperatures"]] + [ALL]
    lines = ["# Evaluation report", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in settings.items()]
    lines += ["", "Win rate = P(r_A > r_B) + P(r_A = r_B) / 2 on the same prompt and temperature; "
              "brackets: 95% bootstrap interval over prompts. Ties are listed apart."]
    for judge in judges:
        lines += [
            "", f"## Judge: {judge}", "", f"![win rates, {judge}]({plots[f'win_{judge}'].name})", "",
            "Win rate of the row policy over the column policy (all temperatures):", "",
            _matrix(rows, judge, policies, "win_rate", lambda r: _fmt(r, True)), "",
            "Ties (all temperatures):", "",
            _matrix(rows, judge, policies, "tie", lambda r: f"{r['value']:.0%}"), "",
            "Mean reward by temperature:", "",
            _by_temperature(rows, judge, policies, "mean_reward", columns),
        ]
        if baseline in policies:
            others = [p for p in policies if p != baseline]
            lines += ["", f"Reward advantage over `{baseline}` (same prompts):", "",
                      _by_temperature(rows, judge, others, "advantage", columns)]
    lines += ["", "## Diversity", "", "Distinct-2 of the generations (distinct word bigrams / all word bigrams; "
              "1 = no bigram repeats), by temperature:", "",
              _table(["policy", *columns], [[p] + [f"{_lookup(rows, policy=p, temperature=t, statistic='distinct_2')['value']:.3f}"
                                                   for t in columns] for p in policies])]
    lines += ["", "## Mean reward vs temperature", "", f"![reward vs temperature]({plots['temperature'].name})"]
    if "training" in plots:
        lines += ["", "## Training curves", "", f"![training curves]({plots['training'].name})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _policy_dir(name: str, path: str, out: Path) -> str:
    """An exported directory as is; a Lightning ``.ckpt`` or DeepSpeed checkpoint is exported first."""
    source = Path(path)
    if source.is_file() or (source / "latest").is_file():
        return str(export(path, str(out / "policies" / name)))
    require_pretrained(path, f"policy {name!r}:")
    return path


def evaluate(
    policies: dict[str, str],
    judges: dict[str, str] = dict(DEFAULT_JUDGES),
    prompts: str = "embedded_default/data/eval.jsonl",
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
) -> list[dict]:
    """Sample from every policy, score with every judge, and write win rates, rewards, plots and a report.

    Writes under ``out``: ``generations.jsonl`` (one record per policy, temperature and
    prompt, with every judge's reward), ``results.csv`` / ``results.json`` (every estimate with
    its 95% interval; see :func:`summarize`), ``win_rate_<judge>.png``,
    ``reward_vs_temperature.png``, ``training_curves.png`` (with ``logs``) and ``report.md``.

    Args:
        policies: Name -> exported directory (or hub id, or a training checkpoint, exported first).
        judges: Name -> reward-model directory (with ``reward_head.safetensors``), or ``vader``
            for the embedded default's gold reward.
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
        baseline: Policy the reward advantage is measured against (skipped when absent).
        bootstrap_samples: Bootstrap resamples per interval.
        logs: Name -> run directory or ``metrics.csv`` of training runs, for the training curves.
        device: ``cpu`` or ``cuda``.
    """
    for name, spec in judges.items():
        require_judge(name, spec)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt_list = read_prompts(prompts, prompt_column, num_prompts, as_chat=chat_prompts)
    policy_dirs = {name: _policy_dir(name, path, out_dir) for name, path in policies.items()}
    judge_fns = {
        name: load_judge(spec, batch_size=batch_size, max_prompt_length=max_prompt_length, max_length=max_length,
                         device=device, trust_remote_code=trust_remote_code)
        for name, spec in judges.items()
    }
    records, scores = sample_and_score(
        policy_dirs, prompt_list, judge_fns, temperatures=temperatures, top_p=top_p, max_new_tokens=max_new_tokens,
        max_prompt_length=max_prompt_length, batch_size=batch_size, seed=seed, device=device,
        trust_remote_code=trust_remote_code,
    )
    if baseline is not None and baseline not in policies:
        log.warning("baseline %r is not among the policies %s: no reward advantage reported", baseline, list(policies))
    rows = summarize(scores, temperatures, baseline=baseline, samples=bootstrap_samples, seed=seed)
    rows += diversity(records, temperatures)

    write_jsonl(out_dir / "generations.jsonl", records)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = list(policies)
    plots = {f"win_{j}": plot_win_matrix(rows, j, names, out_dir / f"win_rate_{j}.png") for j in judges}
    plots["temperature"] = plot_reward_vs_temperature(rows, list(judges), names, temperatures,
                                                      out_dir / "reward_vs_temperature.png")
    if logs:
        plots["training"] = plot_training_curves(logs, out_dir / "training_curves.png")
    settings = {"policies": names, "judges": list(judges), "prompts": prompts, "num_prompts": len(prompt_list),
                "temperatures": list(temperatures), "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                "baseline": baseline, "bootstrap_samples": bootstrap_samples}
    report = write_report(rows, settings, plots, out_dir)
    print(f"Wrote {len(records)} generations and {len(rows)} estimates; report: {report}")
    return rows
