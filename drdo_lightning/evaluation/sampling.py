"""Sampling and scoring every policy at every temperature."""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import numpy as np
from tqdm import tqdm

from drdo_lightning.data.pairs import RowError, check_messages, is_conversation, user_turn
from drdo_lightning.data.readers import read_rows
from drdo_lightning.errors import DataError
from drdo_lightning.evaluation.generation import Prompt, generate, load_policy
from drdo_lightning.evaluation.judges import Judge
from drdo_lightning.evaluation.statistics import Scores

log = logging.getLogger(__name__)
PAPER_TEMPERATURES = (0.2, 0.5, 0.7, 0.9)


def read_prompts(path: str, column: str = "prompt", limit: int | None = None, *, as_chat: bool = False) -> list[Prompt]:
    """Prompts from any file :func:`data.read_rows` reads, the first ``limit``: text, or conversations
    (lists of messages, ending in a turn the policy answers) that the policy's chat template renders.
    ``as_chat`` reads a text prompt as a conversation of one user turn (for chat-trained policies)."""
    prompts: list[Prompt] = []
    for number, row in read_rows(path):
        value = row.get(column)
        try:
            if is_conversation(value):
                prompts.append(check_messages(value, column))
                if value[-1]["role"] == "assistant":
                    raise RowError(column, "bad_roles", "a conversation to answer must not end with an assistant turn")
            elif isinstance(value, str) and value.strip():
                prompts.append(user_turn(value) if as_chat else value)
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
