"""Tokenization and truncation of pairs, and loading a tokenizer.

Truncation rule (per pair, applied identically to chosen and rejected):
  1. A prompt longer than ``max_prompt_length`` tokens keeps its *last* tokens (the part
     nearest the response), after any special tokens the tokenizer puts first (BOS).
  2. A response that does not fit in ``max_length - len(prompt)`` keeps its *first* tokens.
     With ``drop_long=True`` such pairs are dropped instead (the paper filters them).
Every truncation and drop is counted (:func:`describe_counts` says them in words).

Texts are tokenized whole and truncated here, so transformers' warning that a text is longer than
the model takes is turned off for these calls (``verbose=False``): it does not apply."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from drdo_lightning.data.pairs import TextPair
from drdo_lightning.errors import require_pretrained

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_MAX_PROMPT_LENGTH = 512  # prompt tokens kept unless a run says otherwise (the paper's budget)


def ends_in_whitespace(pair: TextPair) -> bool:
    """A plain-text prompt that ends in whitespace (see :func:`warn_trailing_whitespace`)."""
    return not pair.prompt_has_special_tokens and pair.prompt[-1:].isspace()


def warn_trailing_whitespace(n_ending: int, n: int) -> None:
    """Warn that ``n_ending`` of ``n`` prompts end in whitespace (:func:`ends_in_whitespace`), if any do."""
    if n_ending:
        log.warning(
            "%d of %d prompts end in whitespace. Prompt and response are tokenized apart, so that space "
            "becomes a token of its own instead of joining the response's first word as it does in "
            "generation; strip it from the prompts (or begin the responses with it)", n_ending, n,
        )


def truncate_prompt(ids: list[int], max_prompt_length: int, prefix: int) -> list[int]:
    """Rule 1 of the truncation rule: keep the first ``prefix`` ids (the tokenizer's BOS) and the
    last ``max_prompt_length - prefix`` of the rest."""
    if len(ids) <= max_prompt_length:
        return ids
    return ids[:prefix] + ids[len(ids) - (max_prompt_length - prefix):]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of ``texts`` in one batch; ``special``: with the tokenizer's special tokens (BOS).
    Quiet about lengths over the model's maximum: truncation is ours (rule 1 and 2)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special, return_attention_mask=False, verbose=False)["input_ids"]


def special_prefix_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many special tokens (BOS) the tokenizer puts before a text: rule 1 keeps them."""
    return len(tokenizer("", add_special_tokens=True, verbose=False)["input_ids"])


def encode_prompts(prompts: list[str], templated: list[bool], tokenizer: PreTrainedTokenizerBase,
                   max_prompt_length: int) -> tuple[list[list[int]], list[bool]]:
    """Prompt ids by the BOS rule, truncated by rule 1, and whether each was truncated.

    Plain text gets the tokenizer's special prefix (BOS, if any), which truncation keeps; a prompt
    rendered with a chat template (``templated``) already carries its own special tokens.
    """
    ids: list[list[int]] = [[] for _ in prompts]
    for flag in (False, True):
        idx = [i for i, t in enumerate(templated) if t == flag]
        for i, seq in zip(idx, _encode(tokenizer, [prompts[i] for i in idx], special=not flag)):
            ids[i] = seq
    prefix = special_prefix_length(tokenizer)
    kept = [truncate_prompt(seq, max_prompt_length, 0 if t else prefix) for seq, t in zip(ids, templated)]
    return kept, [len(k) < len(seq) for k, seq in zip(kept, ids)]


def tokenize_pairs(
    pairs: list[TextPair],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    max_length: int,
    drop_long: bool,
) -> tuple[dict[str, list], Counter[str]]:
    """Tokenize prompts and responses in batches and apply the module's truncation rule.

    Returns columns ``prompt_ids``, ``chosen_ids`` (and ``rejected_ids``, scores when
    present) and counts of what was truncated or dropped.
    """
    counts: Counter[str] = Counter()
    has_rejected = pairs[0].rejected is not None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    # A chat-templated prompt already carries its special tokens and its responses their
    # end-of-turn markers; plain text gets the tokenizer's BOS (if any) and an EOS.
    templated = [p.prompt_has_special_tokens for p in pairs]
    prompt_ids, prompt_truncated = encode_prompts([p.prompt for p in pairs], templated, tokenizer, max_prompt_length)
    responses = {
        key: [seq if templated[i] else seq + eos for i, seq in enumerate(_encode(tokenizer, [getattr(p, key) for p in pairs], False))]
        for key in (("chosen", "rejected") if has_rejected else ("chosen",))
    }

    out: dict[str, list] = {"prompt_ids": [], **{f"{k}_ids": [] for k in responses}}
    score_keys = [k for k in ("chosen_score", "rejected_score") if getattr(pairs[0], k) is not None]
    for k in score_keys:
        out[k] = []
    for i, pair in enumerate(pairs):
        prompt = prompt_ids[i]
        if prompt_truncated[i]:
            counts["prompt_truncated"] += 1
        budget = max_length - len(prompt)
        resp = {k: r[i] for k, r in responses.items()}
        if any(len(r) > budget for r in resp.values()):
            if drop_long:
                counts["dropped_too_long"] += 1
                continue
            resp = {k: r[:budget] for k, r in resp.items()}
            counts["response_truncated"] += 1
        out["prompt_ids"].append(prompt)
        for k, r in resp.items():
            out[f"{k}_ids"].append(r)
        for k in score_keys:
            out[k].append(getattr(pair, k))
    return out, counts


def describe_counts(counts: Counter[str], pairs: int, *, max_prompt_length: int, max_length: int) -> str:
    """:func:`tokenize_pairs`' ``counts`` for ``pairs`` pairs, in words."""
    words = {
        "prompt_truncated": f"prompts truncated to max_prompt_length {max_prompt_length} (their first tokens dropped)",
        "response_truncated": f"pairs with responses truncated to fit max_length {max_length} (their last tokens "
                              "dropped; drop_long drops such pairs instead)",
        "dropped_too_long": f"pairs dropped by drop_long (prompt and response did not fit max_length {max_length})",
    }
    return ", ".join(f"{counts[key]} of {pairs} {text}" for key, text in words.items() if counts[key])


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """Load a tokenizer; give it a pad token if it has none (padding is masked out anyway)."""
    require_pretrained(name_or_path, "model")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if tokenizer.pad_token_id is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            log.warning("tokenizer %s had no pad, EOS or UNK token: added '<pad>'", name_or_path)
    if chat_template is not None:
        path = Path(chat_template).expanduser()
        tokenizer.chat_template = path.read_text() if path.is_file() else chat_template
    return tokenizer


def chat_renderer(tokenizer: PreTrainedTokenizerBase):
    """``render(messages, add_generation_prompt) -> str`` with the tokenizer's chat template, or None."""
    if not tokenizer.chat_template:
        return None
    return lambda messages, add_generation_prompt: tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
