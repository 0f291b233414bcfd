"""Sampling responses from a policy: seeded nucleus sampling, batched with left padding."""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from drdo_lightning.data.pairs import is_conversation
from drdo_lightning.data.tokenization import encode_prompts, load_tokenizer
from drdo_lightning.errors import DataError

log = logging.getLogger(__name__)

Prompt = str | list[dict]  # text, or a conversation that the policy's chat template renders

def _prompt_text(prompt: Prompt, tokenizer: PreTrainedTokenizerBase) -> tuple[str, bool]:
    """A prompt as text, and whether a chat template rendered it (with its generation prompt)."""
    if not is_conversation(prompt):
        return prompt, False
    if not tokenizer.chat_template:
        raise DataError(f"a prompt is a conversation, and the policy {tokenizer.name_or_path} has no chat template to render it")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), True


class Generated(NamedTuple):
    """What :func:`generate_ids` sampled, one entry per prompt."""

    texts: list[str]  # the responses as :func:`generate` returns them
    prompt_ids: list[list[int]]  # the prompt's ids as the policy read them (BOS rule, truncation)
    response_ids: list[list[int]]  # the sampled ids: up to and including the first EOS, else all max_new_tokens


@torch.inference_mode()
def generate_ids(
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
) -> Generated:
    """One sampled response per prompt, as text (special tokens removed) and as the token ids of the
    prompt and of the response (what a log-probability of the response, e.g.
    :func:`evaluation.divergence.response_logps`, scores).

    Batches are left-padded so every row continues from its last prompt token. Batch ``b`` is
    sampled right after ``torch.manual_seed(seed + b)`` inside a forked RNG: the same seed,
    prompts and batch size give the same responses whatever ran before, and the caller's RNG
    state is untouched. ``temperature=0`` decodes greedily.
    """
    device = next(model.parameters()).device
    # Prompt ids as in training (:func:`data.tokenization.encode_prompts`, the BOS rule and rule 1).
    texts, templated = zip(*(_prompt_text(p, tokenizer) for p in prompts)) if prompts else ((), ())
    encoded, _ = encode_prompts(list(texts), list(templated), tokenizer, max_prompt_length)
    # Nucleus sampling only, as in the paper: top_k=0 switches off a top-k cut a model's generation config may carry.
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    if temperature == 0:
        sampling = {"do_sample": False}
    responses: list[str] = []
    response_ids: list[list[int]] = []
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
                use_cache=True,  # a training policy's config may switch the cache off (gradient checkpointing)
                **sampling,
            )
        responses += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        response_ids += [_until_eos(row, tokenizer.eos_token_id) for row in out[:, width:].tolist()]
        if progress is not None:
            progress.update(1)
    return Generated(responses, [list(ids) for ids in encoded], response_ids)


def _until_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """A generated row up to and including its first EOS (what follows is padding); all of it without one."""
    if eos_token_id is not None and eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    return ids


def generate(model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], **options) -> list[str]:
    """One sampled response per prompt (text after the prompt, special tokens removed); ``options``
    are :func:`generate_ids`'s."""
    return generate_ids(model, tokenizer, prompts, **options).texts


def load_policy(path: str, *, device: str = "cpu", trust_remote_code: bool = False):
    """A causal LM and its tokenizer from an exported directory or hub id."""
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code).to(device).eval()
    return model, load_tokenizer(path, trust_remote_code=trust_remote_code)
