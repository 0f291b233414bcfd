"""A causal language model with a linear reward head: "a model who can do both".

The policy keeps its language-modelling head and gains ``r̂(x, y)``, a scalar read from the
final hidden state at the last non-padding token. One forward returns both.

On disk the model is a plain Hugging Face directory (``config.json``, safetensors weights,
tokenizer) that ``transformers`` alone loads for generation, plus ``reward_head.safetensors``
for the head. Load both with :meth:`CausalLMWithRewardHead.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from drdo_lightning import losses

REWARD_HEAD_FILE = "reward_head.safetensors"


class LMOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    rewards: Tensor | None  # [B], or None when the model has no reward head


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended position of each row; correct for left and right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def _gathered(module: nn.Module):
    """Context in which ``module``'s parameters can be written, also when ZeRO-3 partitioned them.

    Under ``deepspeed.zero.Init`` (DeepSpeed ZeRO-3) a new parameter holds only this rank's
    shard; writing it needs the full tensor. Rank 0's values are broadcast on exit.
    """
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # only reached when DeepSpeed made the parameters

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


class CausalLMWithRewardHead(nn.Module):
    """Wraps any ``AutoModelForCausalLM`` and adds an optional ``hidden -> 1`` reward head."""

    def __init__(self, lm: PreTrainedModel, reward_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.reward_head = reward_head

    @staticmethod
    def new_reward_head(hidden_size: int) -> nn.Linear:
        """A freshly initialised head; its init draws from torch's global RNG (seed it)."""
        head = nn.Linear(hidden_size, 1)
        with _gathered(head):
            nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
            nn.init.zeros_(head.bias)
        return head

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        reward_head: bool = True,
        trust_remote_code: bool = False,
        torch_dtype: torch.dtype | str | None = None,
    ) -> CausalLMWithRewardHead:
        """Load a causal LM from a local directory or hub id.

        With ``reward_head=True`` the saved head is loaded when the directory has one, and a
        new head is initialised otherwise (e.g. when starting a student from an SFT model).
        """
        lm = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=torch_dtype
        )
        head = None
        if reward_head:
            head = cls.new_reward_head(lm.config.hidden_size)
            head_file = Path(path) / REWARD_HEAD_FILE
            if head_file.is_file():
                with _gathered(head):
                    head.load_state_dict(load_file(head_file))
            head.to(dtype=lm.dtype)
        return cls(lm, head)

    def _last_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # Positions count attended tokens only, so a left-padded row sees the same positions as
        # its right-padded twin (models with absolute positions, e.g. GPT-2, depend on this).
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state

    def _rewards(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.reward_head(last.to(self.reward_head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> LMOutput:
        """Logits ``[B, T, V]`` and rewards ``[B]`` from one pass of the backbone."""
        hidden = self._last_hidden(input_ids, attention_mask)
        logits = self.lm.get_output_embeddings()(hidden)
        rewards = self._rewards(hidden, attention_mask) if self.reward_head is not None else None
        return LMOutput(logits, rewards)

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards ``[B]`` only; skips the vocabulary projection (for scoring)."""
        if self.reward_head is None:
            raise ValueError("this model has no reward head")
        return self._rewards(self._last_hidden(input_ids, attention_mask), attention_mask)

    def sequence_logps(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, average: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Response log-probs ``z = log pi(y|x)`` ``[B]`` and rewards ``[B]`` (None without a head), one backbone pass.

        The same values as ``losses.sequence_logps(self(input_ids, attention_mask).logits, labels)``
        (``labels`` unshifted, ``-100`` at prompt and padding positions), but only the positions
        that predict a response token are projected onto the vocabulary: prompt and padding
        positions never get logits. That saves their share of the largest matrix product and of
        the largest activation (``[B, T, V]``); e.g. a quarter of both with 64-token prompts
        before 192-token responses.
        """
        hidden = self._last_hidden(input_ids, attention_mask)
        rewards = self._rewards(hidden, attention_mask) if self.reward_head is not None else None
        targets = labels[:, 1:]
        scored = targets != -100  # position t predicts token t + 1
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][scored])  # [response tokens in the batch, V]
        per_token = losses.token_logps(logits, targets[scored])
        total = per_token.new_zeros(labels.shape[0]).index_add(0, scored.nonzero()[:, 0], per_token)
        if average:
            total = total / scored.sum(-1).clamp(min=1)
        return total, rewards

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the model (and tokenizer) to ``path`` atomically: a temp dir, then a rename.

        Safe to call on every rank; only the caller decides who writes. An existing ``path``
        is replaced only once the new directory is complete. ``state_dict`` (the keys of
        ``self.state_dict()``) is written instead of the module's own weights, e.g. weights
        gathered from DeepSpeed ZeRO-3 shards, where the module holds only this rank's part.
        """
        lm_state, head_state = None, self.reward_head.state_dict() if self.reward_head is not None else None
        if state_dict is not None:
            lm_state = {k.removeprefix("lm."): v for k, v in state_dict.items() if k.startswith("lm.")}
            head_state = {k.removeprefix("reward_head."): v for k, v in state_dict.items() if k.startswith("reward_head.")}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
        self.lm.save_pretrained(staging, safe_serialization=True, state_dict=lm_state)
        if self.reward_head is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()}, staging / REWARD_HEAD_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            path.rename(backup)
            staging.rename(path)
            shutil.rmtree(backup)
        else:
            staging.rename(path)
        return path
