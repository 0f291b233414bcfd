"""Sampling k responses per prompt from the policy, through one interface (:class:`Sampler`).

The objectives never see how responses were sampled: a backend takes the policy, the prompts,
the options and a seed and returns :class:`Samples`. :class:`GenerateSampler` is Hugging Face
``generate`` (:func:`evaluation.generation.generate_ids`); another backend (vLLM) implements the
same call.

Seeds: each step samples with :func:`step_seed` of (the run's seed, the step, the rank), so a
step sampled again after a resume draws the same responses, and no process's sampling moves the
global random streams (the data order, dropout).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from drdo_lightning.evaluation.generation import Prompt, generate_ids
from drdo_lightning.online.options import OnlineOptions


def step_seed(seed: int, *parts: int | str) -> int:
    """A sampling seed in ``[0, 2**63)`` from the run's ``seed`` and what tells draws apart (the stage,
    the step, the rank): a hash, so neighbouring steps or ranks draw unrelated streams."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Samples:
    """``k`` responses for each of ``P`` prompts, prompt-major: response ``j`` of prompt ``i`` is at ``i * k + j``."""

    prompts: list[Prompt]  # [P]
    k: int
    prompt_ids: list[list[int]]  # [P] each prompt as the policy read it (template, BOS rule, truncation)
    response_ids: list[list[int]]  # [P * k] as sampled, up to and including the first EOS
    texts: list[str]  # [P * k] the responses decoded, special tokens removed
    ended: list[bool]  # [P * k] the response ends in EOS (not cut at max_new_tokens)

    def prompt_of(self, sample: int) -> int:
        return sample // self.k


class Sampler(Protocol):
    """A sampling backend: ``options.k`` responses per prompt from ``model`` (a causal LM),
    drawn from ``seed`` alone, with no gradient; ``model`` is left in the mode it was in."""

    def __call__(self, model: torch.nn.Module, prompts: Sequence[Prompt], options: OnlineOptions, seed: int) -> Samples:
        ...


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout), back in the mode it was in afterwards."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


class GenerateSampler:
    """Hugging Face ``generate``: the k copies of each prompt in one left-padded batch, nucleus
    sampling with the KV cache (:func:`evaluation.generation.generate_ids`), in eval mode; each prompt
    cut to ``max_prompt_length`` tokens as the data's pairs are (the data module's budget)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int) -> None:
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length

    def __call__(self, model: torch.nn.Module, prompts: Sequence[Prompt], options: OnlineOptions, seed: int) -> Samples:
        repeated = [p for p in prompts for _ in range(options.k)]
        with evaluating(model):
            generated = generate_ids(
                model, self.tokenizer, repeated, temperature=options.temperature, top_p=options.top_p,
                max_new_tokens=options.max_new_tokens, max_prompt_length=self.max_prompt_length,
                batch_size=max(len(repeated), 1), seed=seed,
            )
        eos = self.tokenizer.eos_token_id
        return Samples(
            prompts=list(prompts), k=options.k, prompt_ids=generated.prompt_ids[:: options.k],
            response_ids=generated.response_ids, texts=generated.texts,
            ended=[bool(ids) and ids[-1] == eos for ids in generated.response_ids],
        )
