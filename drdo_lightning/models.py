"""A causal language model with a linear reward head: "a model who can do both".

The policy keeps its language-modelling head and gains ``r̂(x, y)``, a scalar read from the
final hidden state at the last non-padding token. One forward returns both.

On disk the model is a plain Hugging Face directory (``config.json``, safetensors weights,
tokenizer) that ``transformers`` alone loads for generation, plus ``reward_head.safetensors``
for the head. Load both with :meth:`CausalLMWithRewardHead.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from drdo_lightning import logprobs
from drdo_lightning.errors import REWARD_MODEL_MADE_BY, UserError, require_pretrained
from drdo_lightning.lora import backbone
from drdo_lightning.packing import Packing, pack, supports_packing

REWARD_HEAD_FILE = "reward_head.safetensors"

log = logging.getLogger(__name__)

# Logits elements per chunk of the chunked head (256 MiB in fp32, 523 positions at 128k tokens).
# Each chunk's backward adds its share into the head's whole weight gradient, so many small chunks
# cost time (measured at 128k: 130 positions per chunk 1.7x the one-piece step's time, 512 about
# 1.35x) while the step's peak memory did not depend on the chunk size in that range.
HEAD_CHUNK_ELEMENTS = 1 << 26
CHUNKED_HEAD_MIN_VOCABULARY = 100_000


class KeptPositions(NamedTuple):
    """The positions of a batch that go through the LM head (:meth:`CausalLMWithRewardHead.sequence_logps`)."""

    keep: Tensor  # [B, T] bool: projected onto the vocabulary
    predicts: Tensor  # [B, T] bool: predicts a response token
    predicts_prompt: Tensor  # [B, T] bool: predicts a prompt token (only when prompt log-probs are asked for)
    last: Tensor  # [B, T] bool: each row's last token, where the reward head reads
    targets: Tensor  # [K]: each kept position's next token (0 where it predicts nothing)
    rows: Tensor  # [K]: each kept position's row


class LMOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    rewards: Tensor | None  # [B], or None when the model has no reward head


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended position of each row; correct for left and right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count attended tokens only, so a left-padded row sees the same positions as
    its right-padded twin (models with absolute positions, e.g. GPT-2 and OPT, depend on this)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_prediction_mask(attention_mask: Tensor, labels: Tensor) -> Tensor:
    """``[B, T]``: the attended positions whose next token is an attended prompt token (not a
    response token, ``labels`` ``-100``); the first token of a row has no predicting position."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    mask[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool() & (labels[:, 1:] == -100)
    return mask


def logits_after_head(lm: PreTrainedModel) -> Callable[[Tensor], Tensor] | None:
    """What the model's forward does to its LM head's output before returning logits.

    Known families: Gemma-2/3's soft-capping ``c * tanh(x / c)``, Cohere's ``x * logit_scale``,
    Granite's ``x / logits_scaling``; None (nothing) for the rest. An architecture not listed here
    that transforms its logits is caught by :meth:`CausalLMWithRewardHead.head_is_reproduced`.
    """
    config = backbone(lm).config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        return lambda x: torch.tanh(x / softcap) * softcap
    if getattr(config, "logit_scale", None) is not None and config.model_type.startswith("cohere"):
        return lambda x: x * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        return lambda x: x / config.logits_scaling
    return None


def vocabulary_size(lm: PreTrainedModel) -> int:
    """Rows of the LM head: the vocabulary the logits span."""
    weight = lm.get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 keeps the real shape in ds_shape


def head_chunk_rows(lm: PreTrainedModel, chunked: bool | None) -> int | None:
    """Positions per chunk of the chunked LM head (``HEAD_CHUNK_ELEMENTS`` logits), or None for the one-piece head.

    ``chunked=None`` decides by the vocabulary: chunked from ``CHUNKED_HEAD_MIN_VOCABULARY`` tokens on.
    """
    vocabulary = vocabulary_size(lm)
    if chunked is None:
        chunked = vocabulary >= CHUNKED_HEAD_MIN_VOCABULARY
    return max(1, HEAD_CHUNK_ELEMENTS // vocabulary) if chunked else None


def head_input_width(lm: PreTrainedModel) -> int:
    """Width of the hidden state the LM head reads, which the reward head reads too.

    Not always ``config.hidden_size``: OPT-350M projects its 1024-wide states to 512 first.
    """
    head = lm.get_output_embeddings()
    weight = head.weight
    return int(getattr(weight, "ds_shape", weight.shape)[-1])  # ZeRO-3 keeps the real shape in ds_shape


_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def remove_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0; returns how many were non-zero.

    Covers ``nn.Dropout`` modules, float attributes that architectures read at forward time
    (``self.dropout``, ``self.attention_dropout``, OPT's ``layerdrop``...) and the configs they
    may read them from, so nothing stays random in train mode whatever the architecture.
    """
    changed = 0

    def zero_floats(obj) -> None:
        nonlocal changed
        for name, value in list(vars(obj).items()):
            if "drop" in name and isinstance(value, float):
                changed += value != 0.0
                setattr(obj, name, 0.0)

    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            changed += module.p != 0.0
            module.p = 0.0
        zero_floats(module)
        config = getattr(module, "config", None)
        if config is not None:
            for sub in {id(c): c for c in (config, config.get_text_config())}.values():
                zero_floats(sub)
    return changed


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

    # Checked once per model, on first use: whether project() gives the model's own logits, and
    # whether its forward keeps packed sequences apart.
    _head_reproduced: bool | None = None
    _packs: bool | None = None

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
        require_pretrained(path, "model")
        lm = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=torch_dtype
        )
        head = None
        if reward_head:
            head = cls.new_reward_head(head_input_width(lm))
            head_file = Path(path) / REWARD_HEAD_FILE
            if head_file.is_file():
                with _gathered(head):
                    head.load_state_dict(load_file(head_file))
        return cls(lm, head)

    def _head_path(self, input_ids: Tensor, attention_mask: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """The wrapped LM's own forward, projecting only the positions where ``keep`` ``[B, T]`` is True.

        Returns ``(logits, head_inputs)`` at the kept positions, flattened row-major to ``[N, V]``
        and ``[N, H]`` (``[B, T, V]``/``[B, T, H]`` with ``keep=None``). Going through the model's own
        forward keeps whatever the architecture does after its head (Gemma-2's logit soft-capping,
        Cohere's ``logit_scale``, Granite's ``logits_scaling``), and its ``logits_to_keep`` skips the
        vocabulary projection of prompt and padding positions. The head's input, the final hidden
        state the reward head reads, is taken on its way into the head.
        """
        captured: list[Tensor] = []
        head = self.lm.get_output_embeddings()
        hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        kwargs = {"logits_to_keep": keep} if keep is not None and self._takes_logits_to_keep else {}
        try:
            logits = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
                **kwargs,
            ).logits
        finally:
            hook.remove()
        (hidden,) = captured
        if keep is not None and logits.dim() == 3:  # the model projected every position
            logits, hidden = logits[keep], hidden[keep]
        return logits, hidden

    def _final_hidden(self, input_ids: Tensor, attention_mask: Tensor, keep: Tensor, packing: Packing | None) -> Tensor:
        """``[K, H]``: the final hidden states the LM head reads at the positions where ``keep`` is
        True (row-major), from the model's own forward with the head given no positions to project
        (so no logits are computed at all). With ``packing`` the forward runs on the packed rows."""
        captured: list[Tensor] = []

        def skip_head(module, args):
            captured.append(args[0])
            return (args[0][..., :0, :],)

        if packing is None:
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
        else:
            inputs = dict(input_ids=packing.pack_tokens(input_ids), attention_mask=None, position_ids=packing.position_ids)
        hook = self.lm.get_output_embeddings().register_forward_pre_hook(skip_head)
        try:
            self.lm(**inputs, use_cache=False)
        finally:
            hook.remove()
        (hidden,) = captured
        if packing is None:
            return hidden[keep]
        # keep only marks attended positions: select among the real tokens, in their padded order
        return packing.unpack(hidden)[keep[attention_mask.bool()]]

    def packing_for(self, attention_mask: Tensor) -> Packing | None:
        """The batch's packing (:func:`packing.pack`), or None for a batch without padding (packing
        would change nothing but the attention kernel: a causal one is faster than a mask) and for a
        model whose forward does not honour packed position ids (checked once,
        :func:`packing.supports_packing`; one notice)."""
        if bool(attention_mask.all()):
            return None
        if self._packs is None:
            self._packs = supports_packing(self.lm)
            if not self._packs:
                log.warning(
                    "%s does not keep packed sequences apart (transformers builds its attention mask without "
                    "the position ids): training on padded batches instead",
                    type(backbone(self.lm)).__name__,
                )
        return pack(attention_mask) if self._packs else None

    def project(self, hidden: Tensor) -> Tensor:
        """Logits from final hidden states: the LM head, then what the model does after it (:func:`logits_after_head`)."""
        logits = self.lm.get_output_embeddings()(hidden)
        return logits if self._after_head is None else self._after_head(logits)

    @functools.cached_property
    def _after_head(self) -> Callable[[Tensor], Tensor] | None:
        return logits_after_head(self.lm)

    def head_is_reproduced(self, input_ids: Tensor) -> bool:
        """Whether :meth:`project` gives the model's own logits, checked once on a short prefix of
        ``input_ids``' first row; on a mismatch the chunked head is off for this model, with a notice."""
        if self._head_reproduced is None:
            ids = input_ids[:1, :16]
            with torch.no_grad():
                own, hidden = self._head_path(ids, torch.ones_like(ids), keep=None)
                ours = self.project(hidden)
            scale = own.detach().float().abs().max().clamp(min=1.0)
            self._head_reproduced = bool(((ours.float() - own.float()).abs().max() <= 1e-4 * scale).item())
            if not self._head_reproduced:
                log.warning(
                    "%s transforms its logits in a way the chunked LM head does not reproduce: its response "
                    "logits are computed in one piece, on padded batches (more memory at large vocabularies)",
                    type(backbone(self.lm)).__name__,
                )
        return self._head_reproduced

    @functools.cached_property
    def _takes_logits_to_keep(self) -> bool:
        # A peft wrapper's forward takes **kwargs and passes them on: ask the model inside.
        return "logits_to_keep" in inspect.signature(backbone(self.lm).forward).parameters

    def _rewards(self, last_hidden: Tensor) -> Tensor:
        """``r̂`` from the final hidden state at each sequence's last token, computed in float32
        (also under bf16 autocast or bf16 weights: the reward is a regression target)."""
        head = self.reward_head
        with torch.autocast(last_hidden.device.type, enabled=False):
            return nn.functional.linear(last_hidden.float(), head.weight.float(), head.bias.float()).squeeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> LMOutput:
        """Logits ``[B, T, V]`` and rewards ``[B]`` from one pass of the backbone."""
        logits, hidden = self._head_path(input_ids, attention_mask, keep=None)
        rewards = self._rewards(hidden[self._last_token_mask(attention_mask)]) if self.reward_head is not None else None
        return LMOutput(logits, rewards)

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards ``[B]`` only; projects one position per row onto the vocabulary (for scoring)."""
        if self.reward_head is None:
            raise ValueError("this model has no reward head")
        _, hidden = self._head_path(input_ids, attention_mask, keep=self._last_token_mask(attention_mask))
        return self._rewards(hidden)

    @staticmethod
    def _last_token_mask(attention_mask: Tensor) -> Tensor:
        last = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
        last[torch.arange(last.shape[0], device=last.device), last_token_index(attention_mask)] = True
        return last

    def sequence_logps(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        *,
        average: bool = False,
        token_unlikelihood: bool = False,
        prompt_logps: bool = False,
        chunk_rows: int | None = None,
        packed: bool = False,
    ) -> tuple[Tensor, ...]:
        """Response log-probs ``z = log pi(y|x)`` ``[B]`` and rewards ``[B]`` (None without a head), one backbone pass.

        The same values as ``logprobs.sequence_logps(self(input_ids, attention_mask).logits, labels)``
        (``labels`` unshifted, ``-100`` at prompt and padding positions), but only the positions
        that predict a response token (and each row's last token, for the reward) go through the
        LM head: prompt and padding positions never get logits. That saves their share of the
        largest matrix product and of the largest activation (``[B, T, V]``); e.g. a quarter of
        both with 64-token prompts before 192-token responses.

        With ``token_unlikelihood=True`` a third value follows: ``sum_t log(1 - p(y_t))`` ``[B]``
        over the same response tokens (their mean with ``average``), from the same token log-probs
        (the token-level unlikelihood of DRDO's ``token_unlikelihood`` preference form).

        With ``prompt_logps=True`` the last value is the *sum* of the log-probs of the prompt tokens
        (every attended token that is not a response token, but the first, which nothing predicts)
        ``[B]``, from the same forward: what an NLL over the whole sequence adds to the response's
        (TRL's ORPO convention). The prompt positions are then projected onto the vocabulary too.

        With ``chunk_rows`` the kept positions go through the LM head ``chunk_rows`` at a time and
        their logits are recomputed in backward (:func:`logprobs.chunked_token_logps`): the head's
        memory is one chunk's ``[chunk_rows, V]``, not the batch's ``[N, V]`` kept for backward and
        its gradient of the same size. Same values; for a model whose logits :meth:`project` does
        not reproduce (:meth:`head_is_reproduced`), the one-piece path runs instead.

        With ``packed=True`` the backbone runs on the batch's sequences packed end to end
        (:mod:`drdo_lightning.packing`): no compute on padding, the same values. It falls back to the
        padded batch, with one notice, for a model that cannot keep packed sequences apart
        (:meth:`packing_for`) or whose head :meth:`project` does not reproduce.
        """
        kept = self._kept_positions(input_ids, attention_mask, labels, prompt_logps)
        reproduced = (chunk_rows is not None or packed) and self.head_is_reproduced(input_ids)
        packing = self.packing_for(attention_mask) if reproduced and packed else None
        if reproduced and (chunk_rows is not None or packing is not None):  # else the one-piece head, as before
            hidden = self._final_hidden(input_ids, attention_mask, kept.keep, packing)
            if chunk_rows is None:
                token = logprobs.token_logps(self.project(hidden), kept.targets)
            else:
                token = logprobs.chunked_token_logps(hidden, kept.targets, self.project, chunk_rows=chunk_rows)
        else:
            logits, hidden = self._head_path(input_ids, attention_mask, keep=kept.keep)
            token = logprobs.token_logps(logits, kept.targets)
        rewards = self._rewards(hidden[kept.last[kept.keep]]) if self.reward_head is not None else None
        return self._sequence_values(token, rewards, kept, average, token_unlikelihood, prompt_logps)

    def _kept_positions(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, prompt_logps: bool) -> KeptPositions:
        predicts = torch.zeros_like(attention_mask, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
        predicts_prompt = prompt_prediction_mask(attention_mask, labels) if prompt_logps else torch.zeros_like(predicts)
        last = self._last_token_mask(attention_mask)
        keep = predicts | predicts_prompt
        keep = keep | last if self.reward_head is not None else keep
        # Every kept row gets a target (0 where it predicts nothing) and is then weighted by
        # whether it predicts: selecting the predicting rows instead would copy the logits.
        targets = torch.where(labels != -100, labels, input_ids if prompt_logps else 0).roll(-1, dims=1)[keep]
        return KeptPositions(keep, predicts, predicts_prompt, last, targets, keep.nonzero()[:, 0])

    @staticmethod
    def _sequence_values(
        token: Tensor, rewards: Tensor | None, kept: KeptPositions, average: bool, token_unlikelihood: bool, prompt_logps: bool
    ) -> tuple[Tensor, ...]:
        """What :meth:`sequence_logps` returns, from the kept positions' token log-probs ``[K]``."""
        count = kept.predicts.sum(-1).clamp(min=1) if average else None
        sequences = kept.keep.shape[0]

        def per_row(values: Tensor, weight: Tensor = kept.predicts[kept.keep], mean: bool = average) -> Tensor:
            total = values.new_zeros(sequences).index_add(0, kept.rows, values * weight)
            return total / count if mean else total

        out = [per_row(token), rewards]
        if token_unlikelihood:
            out.append(per_row(logprobs.log1mexp(token)))
        if prompt_logps:
            out.append(per_row(token, kept.predicts_prompt[kept.keep], mean=False))
        return tuple(out)

    def fuses_head(self, input_ids: Tensor) -> bool:
        """Whether :meth:`loss_and_sequence_logps` can fuse the LM head with the loss
        (:func:`logprobs.fused_head_loss`): the head is a plain linear layer whose output the model
        returns as its logits (checked against the model's own forward, :meth:`head_is_reproduced`)."""
        head = self.lm.get_output_embeddings()
        if type(head) is not nn.Linear or self._after_head is not None:
            return False
        return self.head_is_reproduced(input_ids)

    def loss_and_sequence_logps(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        loss_of: Callable[[tuple[Tensor, ...]], Tensor],
        *,
        groups: int,
        average: bool = False,
        token_unlikelihood: bool = False,
        prompt_logps: bool = False,
        chunk_rows: int | None = None,
        packed: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``(loss, values)``: ``values`` what :meth:`sequence_logps` returns, and the loss
        ``loss_of(values).sum()``, a sum of one term per group (a preference pair: rows ``i`` and
        ``i + groups``, ``i + 2 groups``, ... of the batch).

        With ``chunk_rows`` and where :meth:`fuses_head` allows, the LM head runs fused with the loss
        (:func:`logprobs.fused_head_loss`): a chunk of whole groups at a time, each chunk's gradient
        computed in the forward pass, three head matrix products instead of the chunked head's four,
        and one chunk's logits in memory; a batch with a group of more than twice ``chunk_rows``
        positions takes the recomputing chunked head instead. Each term of ``loss_of`` must then
        depend on its own group's values only. The log-probs in ``values`` then carry no gradient (the loss does; the
        rewards keep theirs). Otherwise the loss is computed from :meth:`sequence_logps`' values.
        """
        options = dict(average=average, token_unlikelihood=token_unlikelihood, prompt_logps=prompt_logps)
        chunks = None
        if chunk_rows is not None and self.fuses_head(input_ids):
            kept = self._kept_positions(input_ids, attention_mask, labels, prompt_logps)
            chunks = logprobs.chunks_of_groups(kept.rows % groups, groups, chunk_rows)
        if chunks is None:  # not fused: the loss of sequence_logps' values
            values = self.sequence_logps(input_ids, attention_mask, labels, chunk_rows=chunk_rows, packed=packed, **options)
            return loss_of(values).sum(), values
        hidden = self._final_hidden(input_ids, attention_mask, kept.keep, self.packing_for(attention_mask) if packed else None)
        rewards = self._rewards(hidden[kept.last[kept.keep]]) if self.reward_head is not None else None
        head = self.lm.get_output_embeddings()
        loss, token = logprobs.fused_head_loss(
            hidden, kept.targets, head.weight, head.bias, rewards, chunks,
            lambda token, rewards: loss_of(self._sequence_values(token, rewards, kept, **options)),
        )
        return loss, self._sequence_values(token, rewards, kept, **options)

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

    def generate(self, *args, **kwargs):
        """The wrapped LM's ``generate`` (transformers' generation, every option of it); the reward head takes no part."""
        return self.lm.generate(*args, **kwargs)


class SequenceClassifierReward(nn.Module):
    """An off-the-shelf reward model: ``AutoModelForSequenceClassification`` with one label.

    The common format of public reward models. Its reward is its own forward's score at the
    position it pools (the last token that is not padding), so it is read exactly as the model
    was trained to be read.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards ``[B]``, float32; rows may be left- or right-padded."""
        position_ids = position_ids_from_mask(attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, 0].float()


RewardModel = CausalLMWithRewardHead | SequenceClassifierReward


def load_reward_model(
    path: str | os.PathLike, *, pad_token_id: int, trust_remote_code: bool = False
) -> RewardModel:
    """A reward model from a directory: one this package trained (a causal LM with
    ``reward_head.safetensors``) or a sequence classifier with one label.

    ``pad_token_id`` is the token the batches are padded with; a sequence classifier finds each
    row's last token by it.
    """
    if (Path(path) / REWARD_HEAD_FILE).is_file():
        return CausalLMWithRewardHead.from_pretrained(path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and config.num_labels == 1:
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
        model.config.pad_token_id = pad_token_id
        return SequenceClassifierReward(model)
    raise UserError(
        f"{path} is not a reward model: it has no {REWARD_HEAD_FILE} (an Oracle trained here) and is not a "
        f"sequence classifier with one label (architectures {config.architectures}, num_labels {config.num_labels}); "
        f"{REWARD_MODEL_MADE_BY}"
    )
