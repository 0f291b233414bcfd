"""Hugging Face directories from training: at the end of ``fit``, and from any checkpoint.

- :class:`ExportHuggingFace` (a callback) writes the trained policy when ``fit`` ends, also
  under DeepSpeed ZeRO-3 and FSDP, where it first gathers the sharded weights.
- ``python -m drdo_lightning export --checkpoint PATH --output DIR`` (:func:`export`) does the
  same from a checkpoint: a Lightning ``.ckpt`` file, or the directory DeepSpeed writes in its
  place (sharded ZeRO-1/2/3 states, consolidated here to fp32), or FSDP's sharded directory.

With ``weights="best"`` the callback writes instead the best checkpoint its run kept: the one
a :class:`~lightning.pytorch.callbacks.ModelCheckpoint` with a ``monitor`` chose (e.g. the highest
``val/reward_accuracy``, as the ``oracle`` and ``reward_model`` recipes do), not the last step.

Either way the directory holds ``config.json``, ``model.safetensors``, the tokenizer (padding on the
left, for batched generation) and
``reward_head.safetensors``: ``transformers.AutoModelForCausalLM`` alone loads it for
generation, :meth:`CausalLMWithRewardHead.from_pretrained` with the reward head. A LoRA run is
written with its adapters merged into the weights, the same kind of directory; with
``adapter=True`` it is written as the adapter alone (``adapter_config.json``,
``adapter_model.safetensors``, which ``peft`` loads onto the base model), with the reward head and
tokenizer beside it.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from drdo_lightning import lora
from drdo_lightning.data.tokenization import load_tokenizer
from drdo_lightning.errors import MissingPathError, SettingError
from drdo_lightning.models import CausalLMWithRewardHead, head_input_width
from drdo_lightning.objectives.base import TRAINING_TARGET_KEY
from drdo_lightning.strategies.fsdp import FSDPStrategy, is_sharded_checkpoint, read_sharded_checkpoint

POLICY_PREFIX = "policy."  # the LightningModule's attribute holding the CausalLMWithRewardHead


def default_export_dir(trainer: L.Trainer) -> Path:
    """``<default_root_dir>/export``: one predictable place per run directory."""
    return Path(trainer.default_root_dir) / "export"


def policy_from_state_dict(
    config: PretrainedConfig,
    state_dict: dict[str, Tensor],
    *,
    trust_remote_code: bool = False,
    lora_spec: dict[str, Any] | None = None,
) -> CausalLMWithRewardHead:
    """A :class:`CausalLMWithRewardHead` with ``config``'s architecture and ``state_dict``'s weights.

    ``state_dict`` has the keys of ``CausalLMWithRewardHead.state_dict()`` (``lm.*``, and
    ``reward_head.*`` when there is a head). The model keeps the weights' dtype and is built
    without a random initialisation first, so this also serves models that barely fit in memory.
    With ``lora_spec`` (the module's ``lora`` option) the state dict is a LoRA policy's: the base
    model is built from its frozen weights, then wrapped with adapters that receive the trained ones.
    """
    if lora_spec is not None:
        policy = policy_from_state_dict(config, lora.base_weights(state_dict), trust_remote_code=trust_remote_code)
        policy.lm = lora.add_adapters(policy.lm, lora_spec)
        policy.load_state_dict(state_dict)
        return policy.eval()
    lm_weights = {k.removeprefix("lm."): v for k, v in state_dict.items() if k.startswith("lm.")}
    head_weights = {k.removeprefix("reward_head."): v for k, v in state_dict.items() if k.startswith("reward_head.")}
    with torch.device("meta"):  # only to learn the concrete class: Auto* classes cannot load a state dict
        lm_class = type(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code))
    dtype = next(v.dtype for v in lm_weights.values() if v.is_floating_point())
    lm = lm_class.from_pretrained(None, config=config, state_dict=lm_weights, dtype=dtype)
    head = None
    if head_weights:
        head = nn.Linear(head_input_width(lm), 1, dtype=head_weights["weight"].dtype)
        head.load_state_dict(head_weights)
    return CausalLMWithRewardHead(lm, head).eval()


def _policy_weights(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The policy's entries of a LightningModule state dict (drops e.g. a frozen reference model)."""
    return {k.removeprefix(POLICY_PREFIX): v for k, v in state_dict.items() if k.startswith(POLICY_PREFIX)}


def _deepspeed_client_state_file(checkpoint_dir: Path) -> Path:
    """Rank 0's model-states file, where Lightning stores its part of the checkpoint (hparams, loops)."""
    tag_dir = checkpoint_dir / (checkpoint_dir / "latest").read_text().strip()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):  # ZeRO-1/2, ZeRO-3
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(f"{checkpoint_dir}: not a DeepSpeed checkpoint (no model states in {tag_dir})")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The policy's weights (``CausalLMWithRewardHead`` keys) and the rest of a training checkpoint.

    The second item holds Lightning's entries: ``hyper_parameters`` (the module's, e.g. the
    starting ``model``), ``datamodule_hyper_parameters`` (e.g. ``tokenizer``), ``global_step``.
    Lightning files are loaded with ``weights_only=True``. A DeepSpeed directory is consolidated
    with ``deepspeed.utils.zero_to_fp32``, which unpickles DeepSpeed's optimizer files in full:
    only export checkpoints you trust.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        state_dict, rest = read_sharded_checkpoint(path)
    elif path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path))
        rest = torch.load(_deepspeed_client_state_file(path), map_location="cpu", weights_only=True)
    else:
        rest = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = rest.pop("state_dict")
    weights = _policy_weights(state_dict)
    if not weights:
        raise ValueError(f"{path}: no '{POLICY_PREFIX}*' weights; is this a drdo_lightning checkpoint?")
    return weights, rest


TRAINING_TARGET_FILE = "training_target.json"


def write_training_target(path: Path, target: dict[str, Any] | None) -> None:
    """Write what a distilling student was trained against (the Oracle margins' scale, the reading of
    its reward) beside its export; nothing for other objectives."""
    if target is not None:
        (path / TRAINING_TARGET_FILE).write_text(json.dumps(target, indent=2) + "\n")


def export(
    checkpoint: str, output: str, tokenizer: str | None = None, model: str | None = None, adapter: bool = False
) -> Path:
    """Write a training checkpoint as a Hugging Face directory (safetensors, tokenizer, reward head).

    Args:
        checkpoint: A Lightning ``.ckpt`` file, or the directory DeepSpeed or FSDP (sharded) write
            in its place (``last.ckpt``, ``epoch=...ckpt``).
        output: Directory to write; an existing one is replaced once the new one is complete.
        tokenizer: Tokenizer path or hub id; default: the tokenizer the run trained with.
        model: Where to read the model's config; default: the run's starting ``model`` (set
            this when that path does not exist on this machine).
        adapter: For a LoRA run: write the adapter (loaded by ``peft`` onto the base model) instead
            of merged weights.
    """
    if not Path(checkpoint).exists():
        raise MissingPathError(f"checkpoint {checkpoint} does not exist: `python -m drdo_lightning fit` writes them "
                               "to the run folder's checkpoints/ (last.ckpt)")
    weights, rest = read_checkpoint(checkpoint)
    hparams = rest.get("hyper_parameters", {})
    data_hparams = rest.get("datamodule_hyper_parameters", {})
    source = model or hparams.get("model")
    if source is None:
        raise ValueError(f"{checkpoint}: the checkpoint does not record its starting model; pass --model")
    trust_remote_code = bool(hparams.get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    lora_spec = hparams.get("lora")
    if adapter and lora_spec is None:
        raise ValueError(f"{checkpoint}: --adapter true needs a LoRA run; this one trained the full model")
    policy = policy_from_state_dict(config, weights, trust_remote_code=trust_remote_code, lora_spec=lora_spec)
    if lora_spec is not None:
        policy = _lora_export(policy, source, adapter)
    if tokenizer is None:  # rebuild the training tokenizer: same source, same chat template
        tok = load_tokenizer(
            data_hparams.get("tokenizer") or source,
            trust_remote_code=trust_remote_code,
            chat_template=data_hparams.get("chat_template"),
        )
    else:
        tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    path = save_for_generation(policy, output, tok)
    write_training_target(path, rest.get(TRAINING_TARGET_KEY))
    print(f"Exported {checkpoint} (step {rest.get('global_step', '?')}) to {path}")
    return path


def _quiet_deepspeed_probe(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


def save_for_generation(policy: CausalLMWithRewardHead, path: str | Path, tokenizer=None,
                        state_dict: dict[str, Tensor] | None = None) -> Path:
    """``policy.save_pretrained`` with a copy of ``tokenizer`` that pads on the left, as batched
    generation needs (an export is for generation; training pads in its own collator, whatever the side).

    transformers' ``save_pretrained`` asks accelerate whether the model is wrapped by DeepSpeed,
    which imports ``deepspeed`` where it is installed, and DeepSpeed's import warns "Setting
    accelerator to CPU" on a machine without a GPU: about DeepSpeed, which a run that saves here
    first has not asked for (a DeepSpeed run imported it with its strategy and was told then), so
    that warning is left out while saving.
    """
    if tokenizer is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.padding_side = "left"
        tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
    deepspeed_logger = logging.getLogger("DeepSpeed")
    deepspeed_logger.addFilter(_quiet_deepspeed_probe)
    try:
        return policy.save_pretrained(path, tokenizer=tokenizer, state_dict=state_dict)
    finally:
        deepspeed_logger.removeFilter(_quiet_deepspeed_probe)


@contextmanager
def _whole_models() -> Iterator[None]:
    """Models built in here are whole tensors on this rank alone, also in a ZeRO-3 run.

    There the strategy has told transformers to create every model partitioned across ranks, a
    collective that the other ranks, not exporting, would never join.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps only this reference to the config
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = live


def _lora_export(policy: CausalLMWithRewardHead, base_model: str, adapter: bool) -> CausalLMWithRewardHead:
    """What a LoRA policy exports as: its adapter (which names ``base_model`` as the model it
    applies to), or the LM with the adapter merged in."""
    if adapter:
        policy.lm.peft_config["default"].base_model_name_or_path = str(base_model)
        return policy
    return lora.merged(policy)


def monitoring_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The first :class:`ModelCheckpoint` of ``trainer`` that keeps checkpoints by a monitored metric."""
    return next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)


class ExportHuggingFace(L.Callback):
    """Write ``save_pretrained`` output (config, safetensors, tokenizer, reward head) on fit end.

    The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` for
    generation and with ``drdo_lightning.CausalLMWithRewardHead.from_pretrained`` for the
    reward head too. By default it holds the weights at the end of training. Under DeepSpeed ZeRO-3
    the weights are gathered one layer at a time onto rank 0's CPU (every rank takes part), so no
    device ever holds the whole model.

    With ``weights="best"`` it holds the weights of the best checkpoint instead: the one the run's
    monitoring :class:`ModelCheckpoint` (the first with a ``monitor``) kept, read back from disk on
    rank 0 (any checkpoint format :func:`read_checkpoint` reads). Which one it was is kept in
    :attr:`selected` (``checkpoint``, ``step``, ``monitor``, ``score``) and logged to the run's
    loggers as ``selected/<monitor>`` and ``selected/step``. When no validation ran (so nothing was
    selected, e.g. ``--trainer.limit_val_batches 0``, or fewer steps than ``val_check_interval``)
    it writes the final weights, with a warning.

    A LoRA policy is written with its adapters merged into the weights, from a CPU copy (the
    trained module keeps its adapters), or as the adapter alone with ``adapter=True``.

    Args:
        dirpath: Output directory; default ``<trainer.default_root_dir>/export``.
        adapter: For LoRA training: write the adapter instead of merged weights.
        weights: ``final`` (the weights when fit ends) or ``best`` (the monitored best checkpoint).
    """

    def __init__(self, dirpath: str | None = None, adapter: bool = False,
                 weights: Literal["final", "best"] = "final") -> None:
        if weights not in ("final", "best"):
            raise SettingError(f"ExportHuggingFace weights must be final or best, got {weights!r}")
        self.dirpath = dirpath
        self.adapter = adapter
        self.weights = weights
        self.selected: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.adapter and pl_module.hparams.get("lora") is None:  # say so before training, not after
            raise ValueError(
                "ExportHuggingFace(adapter=True) needs LoRA training (--model.lora); this run trains the full model"
            )
        if stage == "fit" and self.weights == "best" and monitoring_checkpoint(trainer) is None:
            raise SettingError(
                "ExportHuggingFace(weights=best) exports the checkpoint a ModelCheckpoint with a monitor keeps; this "
                "run has none (add one with monitor and mode, as configs/oracle.yaml does)"
            )

    def directory(self, trainer: L.Trainer) -> Path:
        """Where the export goes: ``dirpath``, or ``<trainer.default_root_dir>/export``."""
        return Path(self.dirpath) if self.dirpath else default_export_dir(trainer)

    def _best(self, trainer: L.Trainer) -> dict[str, Any] | None:
        """The monitored best checkpoint (path, monitor, score; its step once read), None when nothing was selected."""
        checkpoint = monitoring_checkpoint(trainer)
        if checkpoint is None or not checkpoint.best_model_path or checkpoint.best_model_score is None:
            return None
        return {"checkpoint": Path(checkpoint.best_model_path), "step": None, "monitor": checkpoint.monitor,
                "score": float(checkpoint.best_model_score)}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.directory(trainer)
        state_dict = None  # the policy's own weights
        best = self._best(trainer) if self.weights == "best" else None
        if self.weights == "best" and best is None:
            rank_zero_warn("ExportHuggingFace(weights=best): no validation ran, so no checkpoint was selected; "
                           "exporting the final weights")
        if best is not None:
            self.selected = best
            if trainer.is_global_zero:
                state_dict, rest = read_checkpoint(best["checkpoint"])
                best["step"] = rest.get("global_step", best["step"])
            for logger in trainer.loggers:
                step = {} if best["step"] is None else {"selected/step": best["step"]}
                logger.log_metrics({f"selected/{best['monitor']}": best["score"], **step}, step=trainer.global_step)
                logger.save()
        elif getattr(trainer.strategy, "zero_stage_3", False):
            # Collective: every rank sends its shards; rank 0 receives the full weights, on CPU.
            # (DeepSpeed's own gatherer, the one transformers' Trainer uses for ZeRO-3 saves.)
            state_dict = trainer.strategy.deepspeed_engine._zero3_consolidated_16bit_state_dict()
            state_dict = _policy_weights(state_dict) if trainer.is_global_zero else None
        elif isinstance(trainer.strategy, FSDPStrategy):  # collective too: rank 0 receives the full weights
            state_dict = _policy_weights(trainer.strategy.full_state_dict())
        if trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            policy = pl_module.policy
            lora_spec = pl_module.hparams.get("lora")
            if lora_spec is not None:
                if state_dict is None:  # a copy: merging writes into the weights it is built from
                    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}
                config = lora.backbone(policy.lm).config
                with _whole_models():
                    policy = policy_from_state_dict(config, state_dict, lora_spec=lora_spec)
                policy = _lora_export(policy, pl_module.hparams.model, self.adapter)
                state_dict = None  # the rebuilt policy holds the weights
            save_for_generation(policy, path, tokenizer, state_dict)
            write_training_target(path, pl_module.training_target())
            if best is not None:
                rank_zero_info(f"Exported the best checkpoint, {best['checkpoint'].name} (step {best['step']}, "
                               f"{best['monitor']} {best['score']:.4f}), to {path}")
            else:
                rank_zero_info(f"Exported the trained model to {path}")
        trainer.strategy.barrier("export")
