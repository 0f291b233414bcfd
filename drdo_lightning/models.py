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

from drdo_lightning.errors import REWARD_MODEL_MADE_BY, UserError, require_pretrained
from drdo_lightning.lora import backbone
from drdo_lightning.packing import Packing, pack, supports_packing
from drdo_lightning.positions import KeptPositions, last_token_mask, position_ids_from_mask

REWARD_HEAD_FILE = "reward_head.safetensors"

log = logging.getLogger(__name__)


class LMOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    rewards: Tensor | None  # [B], or None when the model has no reward head


class HeadInputs(NamedTuple):
    """One backbone pass at a batch's kept positions (:class:`positions.KeptPositions`), row-major."""

    hidden: Tensor  # [K, H]: the final hidden states the LM head reads
    logits: Tensor | None  # [K, V]: the model's own logits there (the one-piece head), else None
    rewards: Tensor | None  # [B]: r̂ at each row's last token, or None without a reward head


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

    def logits_and_hidden(self, input_ids: Tensor, attention_mask: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
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

    def final_hidden(self, input_ids: Tensor, attention_mask: Tensor, keep: Tensor, packing: Packing | None) -> Tensor:
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

    def head_inputs(self, input_ids: Tensor, attention_mask: Tensor, kept: KeptPositions, *, logits: bool,
                    packing: Packing | None) -> HeadInputs:
        """One pass of the backbone for the kept positions: with ``logits``, the model's own forward
        projecting them (:meth:`logits_and_hidden`); else the hidden states alone, the LM head given
        nothing to project (:meth:`final_hidden`), on the packed rows with ``packing``. The rewards
        come from the same pass."""
        if logits:
            projected, hidden = self.logits_and_hidden(input_ids, attention_mask, keep=kept.keep)
        else:
            projected, hidden = None, self.final_hidden(input_ids, attention_mask, kept.keep, packing)
        rewards = self.reward_at(hidden[kept.last[kept.keep]]) if self.reward_head is not None else None
        return HeadInputs(hidden, projected, rewards)

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
                own, hidden = self.logits_and_hidden(ids, torch.ones_like(ids), keep=None)
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

    def reward_at(self, last_hidden: Tensor) -> Tensor:
        """``r̂`` from the final hidden state at each sequence's last token, computed in float32
        (also under bf16 autocast or bf16 weights: the reward is a regression target)."""
        head = self.reward_head
        with torch.autocast(last_hidden.device.type, enabled=False):
            return nn.functional.linear(last_hidden.float(), head.weight.float(), head.bias.float()).squeeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> LMOutput:
        """Logits ``[B, T, V]`` and rewards ``[B]`` from one pass of the backbone."""
        logits, hidden = self.logits_and_hidden(input_ids, attention_mask, keep=None)
        rewards = self.reward_at(hidden[last_token_mask(attention_mask)]) if self.reward_head is not None else None
        return LMOutput(logits, rewards)

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards ``[B]`` only; projects one position per row onto the vocabulary (for scoring)."""
        if self.reward_head is None:
            raise ValueError("this model has no reward head")
        _, hidden = self.logits_and_hidden(input_ids, attention_mask, keep=last_token_mask(attention_mask))
        return self.reward_at(hidden)

    def fuses_head(self, input_ids: Tensor) -> bool:
        """Whether the LM head can be fused with the loss
        (:func:`logprobs.fused_head_loss`): the head is a plain linear layer whose output the model
        returns as its logits (checked against the model's own forward, :meth:`head_is_reproduced`)."""
        head = self.lm.get_output_embeddings()
        if type(head) is not nn.Linear or self._after_head is not None:
            return False
        return self.head_is_reproduced(input_ids)

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
