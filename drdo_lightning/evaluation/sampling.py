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
from drdo_lightning.evaluation.divergence import response_logps
from drdo_lightning.evaluation.generation import Prompt, generate_ids, load_policy
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
    kl_reference: str | None = None,
) -> tuple[list[dict], Scores]:
    """Sample every policy at every temperature and score every response with every judge.

    Every policy gets the same seeds at a given temperature (common random numbers), which
    lowers the variance of paired comparisons. Returns the generation records and
    ``scores[judge][policy]``, an array ``[len(prompts), len(temperatures)]``.

    With ``kl_reference`` (a model directory or hub id, e.g. the SFT policy) every record also
    holds ``logp``, the response's log-probability under the policy that sampled it, and
    ``reference_logp``, under the reference, both at temperature 1 over the sampled token ids
    (:mod:`.divergence`); their difference is a one-sample estimate of KL(policy || reference)
    (:func:`statistics.divergence`). The reference is loaded once, after the policies, so one model
    is in memory at a time; it must share the policies' tokenizer.
    """
    n_batches = -(-len(prompts) // batch_size)
    records: list[dict] = []
    scores: Scores = {judge: {} for judge in judges}
    sampled: dict[str, tuple[list[list[int]], list[list[int]], dict[str, int]]] = {}  # name -> ids, vocabulary
    with tqdm(total=len(policies) * len(temperatures) * n_batches, desc="sampling", unit="batch") as progress:
        for name, path in policies.items():
            model, tokenizer = load_policy(path, device=device, trust_remote_code=trust_remote_code)
            generated = [
                generate_ids(model, tokenizer, prompts, temperature=t, top_p=top_p, max_new_tokens=max_new_tokens,
                             max_prompt_length=max_prompt_length, batch_size=batch_size, seed=seed, progress=progress)
                for t in temperatures
            ]
            flat_prompts = [p for _ in temperatures for p in prompts]
            flat_responses = [r for g in generated for r in g.texts]
            rewards = {}
            for judge, score in judges.items():
                rewards[judge] = np.asarray(score(flat_prompts, flat_responses), dtype=float)
                scores[judge][name] = rewards[judge].reshape(len(temperatures), len(prompts)).T
            logps = None
            if kl_reference is not None:
                ids = ([p for g in generated for p in g.prompt_ids], [r for g in generated for r in g.response_ids])
                sampled[name] = (*ids, tokenizer.get_vocab())
                logps = response_logps(model, *ids, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
            for k, (t, i) in enumerate(itertools.product(temperatures, range(len(prompts)))):
                records.append({"policy": name, "temperature": t, "prompt_index": i, "prompt": prompts[i],
                                "response": flat_responses[k], "rewards": {j: float(r[k]) for j, r in rewards.items()}})
                if logps is not None:
                    records[-1]["logp"] = float(logps[k])
            del model
    if kl_reference is not None:
        _add_reference_logps(records, sampled, kl_reference, batch_size=batch_size, device=device,
                             trust_remote_code=trust_remote_code)
    return records, scores


def _add_reference_logps(records: list[dict], sampled: dict, reference: str, *, batch_size: int, device: str,
                         trust_remote_code: bool) -> None:
    """``reference_logp`` in every record: the reference's temperature-1 log-prob of the sampled ids."""
    model, tokenizer = load_policy(reference, device=device, trust_remote_code=trust_remote_code)
    vocabulary = tokenizer.get_vocab()
    by_policy: dict[str, list[dict]] = {}
    for r in records:
        by_policy.setdefault(r["policy"], []).append(r)
    for name, (prompt_ids, response_ids, policy_vocabulary) in sampled.items():
        if policy_vocabulary != vocabulary:
            raise DataError(f"KL to {reference}: policy {name!r} has another tokenizer than the reference, so their "
                            "log-probabilities are of different token sequences; give a reference of the same family")
        logps = response_logps(model, prompt_ids, response_ids, pad_token_id=tokenizer.pad_token_id,
                               batch_size=batch_size)
        for record, logp in zip(by_policy[name], logps, strict=True):
            record["reference_logp"] = float(logp)
