"""``python -m drdo_lightning score``: precompute Oracle rewards ``r*(x, y)`` as data columns.

The student never needs the Oracle in memory: score the dataset once, then train with
``--data.chosen_score_column`` / ``--data.rejected_score_column`` pointing at the new columns.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import datasets
import torch
from tqdm import tqdm

from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.pairs import Columns, TextPair, is_conversation, numbered_pairs, render_as_chat
from drdo_lightning.data.readers import read_rows
from drdo_lightning.data.tokenization import (
    chat_renderer,
    ends_in_whitespace,
    load_tokenizer,
    tokenize_pairs,
    warn_trailing_whitespace,
)
from drdo_lightning.errors import REWARD_MODEL_MADE_BY, DataError, MissingPathError, UserError, shipped_made_by
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.models import RewardModel, SequenceClassifierReward, load_reward_model

log = logging.getLogger(__name__)


def require_reward_model(path: str, what: str = "reward model") -> None:
    """Raise a :class:`MissingPathError` unless ``path`` is a directory; whether it holds a reward
    model is checked when it loads (:func:`models.load_reward_model`)."""
    if not Path(path).is_dir():
        raise MissingPathError(f"{what} {path} does not exist", path=path,
                               made_by=shipped_made_by(path) or REWARD_MODEL_MADE_BY)


@torch.inference_mode()
def reward_columns(
    model: RewardModel,
    examples: list[dict],
    pad_token_id: int,
    *,
    batch_size: int,
    sides: tuple[str, ...],
    desc: str = "scoring",
    progress: bool = True,
) -> dict[str, list[float]]:
    """Rewards of every response in ``examples`` (tokenized pairs), per side.

    Batches are formed from length-sorted examples to keep padding small; results come back
    in the input order. ``progress``: a progress bar over the batches, titled ``desc``.
    """
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i]["prompt_ids"]) + len(examples[i]["chosen_ids"])))
    collate = PairCollator(pad_token_id)
    device = next(model.parameters()).device
    out = {side: [0.0] * len(examples) for side in sides}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        batch = collate([examples[i] for i in idx])
        for side in sides:
            rewards = model.rewards(batch[f"{side}_input_ids"].to(device), batch[f"{side}_attention_mask"].to(device))
            for i, r in zip(idx, rewards.tolist()):
                out[side][i] = r
    return out


def load_scorer(path: str, *, device: str = "cpu", trust_remote_code: bool = False, chat_template: str | None = None):
    """``(reward model, its tokenizer)`` from a directory (see :func:`models.load_reward_model`), on ``device``.

    On CPU the model computes in float32 whatever dtype it is stored in: CPUs without bfloat16
    matrix units run it slower than float32, and rewards rounded to 8 mantissa bits would blur
    the margins the students distil.
    """
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, chat_template=chat_template)
    model = load_reward_model(path, pad_token_id=tokenizer.pad_token_id, trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    return (model.float() if device == "cpu" else model), tokenizer


def tokenized_for(
    model: RewardModel, tokenizer, pairs: list[TextPair], cols: Columns, *, max_prompt_length: int, max_length: int
) -> list[dict]:
    """``pairs`` tokenized as ``model`` reads them, one example per pair, in order.

    An Oracle trained here reads text as it was trained (the data module's rule); an off-the-shelf
    sequence classifier whose tokenizer has a chat template reads a one-turn chat, as it was trained.
    A pair whose prompt is a conversation (a list of messages, as ``evaluate`` reads them) is
    rendered with the chat template, its response as the assistant's reply.
    """
    template = chat_renderer(tokenizer)
    reads_chat = isinstance(model, SequenceClassifierReward) and template is not None
    conversations = [is_conversation(p.prompt) for p in pairs]
    if any(conversations) and template is None:
        raise DataError(f"{sum(conversations)} prompts are conversations, and the reward model's tokenizer has no chat "
                        "template to render them", setting="chat_template", advice="give one with {option}")
    pairs = [render_as_chat(p, template, cols) if reads_chat or chat else p for p, chat in zip(pairs, conversations)]
    warn_trailing_whitespace(sum(map(ends_in_whitespace, pairs)), len(pairs))
    columns, counts = tokenize_pairs(pairs, tokenizer, max_prompt_length=max_prompt_length, max_length=max_length, drop_long=False)
    if counts:
        log.info("truncated while scoring: %s", dict(counts))
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


class Scorer:
    """A reward model and its tokenizer: rewards of pairs, tokenized as the model reads them.

    ``score`` writes them as data columns; the reward-model judges of ``evaluate`` use the same.
    """

    def __init__(self, path: str, *, batch_size: int = 32, max_prompt_length: int = 512, max_length: int = 1024,
                 device: str = "cpu", trust_remote_code: bool = False, chat_template: str | None = None) -> None:
        self.model, self.tokenizer = load_scorer(path, device=device, trust_remote_code=trust_remote_code,
                                                 chat_template=chat_template)
        self.template = chat_renderer(self.tokenizer)  # how rows with conversations render for this model
        self.batch_size, self.max_prompt_length, self.max_length = batch_size, max_prompt_length, max_length

    def rewards(self, pairs: list[TextPair], cols: Columns, *, sides: tuple[str, ...], desc: str,
                progress: bool = True) -> dict[str, list[float]]:
        """The reward of every response of ``pairs``, per side, in order (:func:`reward_columns`)."""
        examples = tokenized_for(self.model, self.tokenizer, pairs, cols, max_prompt_length=self.max_prompt_length,
                                 max_length=self.max_length)
        return reward_columns(self.model, examples, self.tokenizer.pad_token_id, batch_size=self.batch_size, sides=sides,
                              desc=desc, progress=progress)


def _write_rows(rows: list[dict], path: Path) -> None:
    if path.suffix == ".jsonl":
        write_jsonl(path, rows)
    else:  # .parquet, checked by score
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        datasets.Dataset.from_list(rows).to_parquet(str(staging))
        staging.replace(path)


def score(
    models: list[str],
    data: str,
    output: str,
    prompt_column: str | None = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str | None = "rejected",
    output_prefix: str = "oracle_",
    batch_size: int = 32,
    max_prompt_length: int = 512,
    max_length: int = 1024,
    split: str = "train",
    chat_template: str | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    on_bad_row: Literal["error", "skip"] = "error",
) -> Path:
    """Score every response of a dataset with one Oracle or an ensemble and write a new file.

    For each response column ``c`` the output gains ``{output_prefix}{c}``: a number for one
    model, or a list with one number per model for an ensemble (e-DPO). All input columns
    are kept; the input is never modified. Sequences are truncated by the same rule as in
    training (see :mod:`drdo_lightning.data`).

    Args:
        models: Reward-model directories, several for an ensemble: Oracles trained here (with
            ``reward_head.safetensors``) or sequence classifiers with one label (public reward
            models), each with its own tokenizer.
        data: Input data (any format :class:`PreferenceDataModule` reads).
        output: Output ``.jsonl`` or ``.parquet`` file; must differ from the input.
        output_prefix: Prefix of the new column names.
        device: ``cpu`` or ``cuda``.
        overwrite: Replace ``output`` if it exists.
        on_bad_row: ``error`` stops on a bad row, naming the first and counting them all; ``skip``
            leaves bad rows (malformed lines too) out of the output and logs how many, by reason.
    """
    out_path = Path(output)
    if out_path.resolve() == Path(data).expanduser().resolve():
        raise UserError(f"output {output} is the input file; scoring never overwrites its input")
    if out_path.suffix not in (".jsonl", ".parquet"):
        raise UserError(f"output {output} must end in .jsonl or .parquet")
    if out_path.exists() and not overwrite:
        raise UserError(f"output {output} exists; pass --overwrite true to replace it")
    if not models:
        raise UserError("give at least one reward model")
    for path in models:
        require_reward_model(path)
    cols = Columns(prompt_column, chosen_column, rejected_column)
    sides = ("chosen", "rejected") if rejected_column else ("chosen",)
    per_model = []  # one {side: {position of the row in data: reward}} per model
    for k, path in enumerate(models):
        scorer = Scorer(path, batch_size=batch_size, max_prompt_length=max_prompt_length, max_length=max_length,
                        device=device, trust_remote_code=trust_remote_code, chat_template=chat_template)
        positions, pairs = zip(*numbered_pairs(data, cols, scorer.template, split=split, on_bad_row=on_bad_row))
        rewards = scorer.rewards(list(pairs), cols, sides=sides, desc=f"model {k + 1}/{len(models)}")
        per_model.append({side: dict(zip(positions, rewards[side])) for side in sides})
    # Every model validates the rows with its own chat template: a row is scored if each read it.
    rows = [(i, row) for i, (_, row) in enumerate(read_rows(data, split, keep_malformed=True))
            if all(i in m[sides[0]] for m in per_model)]
    names = {"chosen": chosen_column, "rejected": rejected_column}
    for side in sides:
        name = f"{output_prefix}{names[side]}"
        for i, row in rows:
            values = [m[side][i] for m in per_model]
            row[name] = values[0] if len(values) == 1 else values
    _write_rows([row for _, row in rows], out_path)
    log.info("wrote %d scored rows to %s", len(rows), out_path)
    return out_path
