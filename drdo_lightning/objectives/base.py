"""The one LightningModule every objective trains through.

An objective is a small subclass that says what its loss reads (:attr:`PreferenceModule.needs`) and
gives its loss once, per pair (:meth:`PreferenceModule.pair_loss`); the base builds every step from
that: one forward over chosen and rejected concatenated, the LM head fused with the loss where the
step allows it (the same per-pair loss, evaluated a chunk of pairs at a time) or not, logging, and
AdamW. An objective whose loss is not a mean over pairs (e-DPO's worst ensemble member over the
batch) overrides :meth:`PreferenceModule.batch_loss` instead and is never fused.

The rest lives in small places of its own: the policy's set-up (:mod:`drdo_lightning.policy_setup`),
the optimizer (:mod:`drdo_lightning.optimization`), device and precision fixes
(:mod:`drdo_lightning.device_placement`), the resume check (:mod:`drdo_lightning.reliability`), the
online mode's sampling, scoring and pairing (:mod:`drdo_lightning.online`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import Tensor

from drdo_lightning import device_placement, heads, lora, optimization, policy_setup, reliability
from drdo_lightning.data.columns import ExampleColumns
from drdo_lightning.data.tokenization import DEFAULT_MAX_PROMPT_LENGTH, load_tokenizer
from drdo_lightning.errors import SettingError, UserError
from drdo_lightning.models import CausalLMWithRewardHead
from drdo_lightning.objectives.oracle_target import OracleTarget
from drdo_lightning.objectives.outputs import HeadSettings, Needs, PairLoss, PairOutputs, forward_pairs
from drdo_lightning.evaluation.judges import load_judge
from drdo_lightning.online.options import OnlineOptions
from drdo_lightning.online.sampling import GenerateSampler
from drdo_lightning.online.source import (
    PAIR_METRICS,
    SAMPLES_FILE,
    OnlineSource,
    append_records,
    sample_logps,
    sample_records,
    step_metrics,
)

# A checkpoint's entry for PreferenceModule.training_target, which exports write beside the model.
TRAINING_TARGET_KEY = "training_target"
# A checkpoint's entry for the online source's random state (online.source.OnlineSource.state_dict).
ONLINE_SOURCE_KEY = "online_source"


def frozen(model: CausalLMWithRewardHead) -> CausalLMWithRewardHead:
    model.requires_grad_(False)
    return model.eval()


def mean_over_pairs(per_pair: Tensor) -> Tensor:
    """The batch's loss from per-pair losses ``[B]``: their mean, summed as the fused head sums it."""
    return (per_pair / per_pair.numel()).sum()


def zero_loss(parameters: Iterable[torch.nn.Parameter]) -> Tensor:
    """``0 * sum_p sum(p)``: a loss of 0 whose gradient is a zero tensor for each trainable parameter
    (none left ``None``), so a step without pairs still runs the backward every process runs: DDP and
    DeepSpeed all-reduce the gradients of every parameter inside it, and a process that skipped its
    backward would leave the others waiting there."""
    return sum(p.sum() * 0.0 for p in parameters if p.requires_grad)


def missing_scores_error(objective: str) -> UserError:
    return UserError(
        f"{objective} distils Oracle rewards and the data has none: set --data.chosen_score_column and "
        "--data.rejected_score_column to the columns that `python -m drdo_lightning score` adds "
        "(oracle_chosen, oracle_rejected)"
    )


SCORE_SHAPE_ERRORS = {
    1: "takes one Oracle score per response; use EDPO for an ensemble (list) column",
    2: "needs ensemble scores: score columns holding one list of K numbers per response",
}


def oracle_scores(batch: dict[str, Tensor], objective: str, dims: int) -> tuple[Tensor, Tensor]:
    """``(r*(x, y_w), r*(x, y_l))`` from the batch's score columns, ``[B]`` (``dims`` 1) or ``[B, K]`` (2)."""
    if "chosen_score" not in batch:
        raise missing_scores_error(objective)
    scores = batch["chosen_score"], batch["rejected_score"]
    if scores[0].dim() != dims:
        raise ValueError(f"{objective} {SCORE_SHAPE_ERRORS[dims]}")
    return scores


class PreferenceModule(L.LightningModule):
    """Shared machinery for every objective.

    Args:
        model: Path or hub id of the starting causal LM (a reward head saved beside it is
            loaded; otherwise a new one is initialised when the objective needs one).
        learning_rate: AdamW peak learning rate (paper: 5e-6 for policies, 1e-5 for SFT).
        weight_decay: AdamW weight decay on matrices (not on biases or norms); paper: 0.05.
        warmup_steps: Linear warm-up steps before the cosine decay.
        average_logps: Use the mean token log-prob per response instead of the sum
            (length-normalised variant).
        gradient_checkpointing: Recompute activations in backward (non-reentrant).
        reward_head_seed: Seed of a new reward head's initialisation (ensemble members differ
            only here); default: the global seed.
        trust_remote_code: Allow model code from the model directory/hub to run. Off by default.
        disable_dropout: Set every dropout probability of the policy to 0, as TRL and the original
            DPO code do: with dropout on, the log-probs and rewards a loss compares are noisy (DPO's
            first loss is not log 2 against an identical reference). The reference never drops out.
        lora: Train LoRA adapters (``peft``) instead of the LM's weights, e.g. ``{r: 16, alpha: 32,
            dropout: 0.0, target_modules: all-linear}``; keys are ``peft.LoraConfig``'s fields or the
            short ``alpha``/``dropout`` (:mod:`drdo_lightning.lora`). The reward head stays fully
            trainable; a reference-based objective's reference is the base model (adapters off).
        chunked_head: Compute response log-probs through the LM head a chunk of positions at a
            time, so no ``[positions, vocabulary]`` logits are kept: in training fused with the
            loss where it is a mean over pairs (:func:`logprobs.fused_head_loss`, each chunk's
            gradients computed in the forward pass), else recomputing each chunk's logits in
            backward (:func:`logprobs.chunked_token_logps`, one more head matrix product per step).
            ``None``: the device's default (:data:`heads.HEAD_DEFAULTS`); on CPU on for vocabularies of
            100k tokens and more, and at any vocabulary for a training step that fuses (measured never
            slower than the one-piece head, at 32k and 128k); on CUDA the same until measured there.
        pack_sequences: Run the model on each padded batch's sequences packed end to end, position
            ids restarting per sequence (:mod:`drdo_lightning.packing`), instead of padded rows: the
            same values without computing on padding (on long-tailed lengths 1.5x the useful tokens/s
            of padded batches, measured). Models that cannot keep packed sequences apart (OPT in
            transformers 5) train padded, with a notice.
        online: Train on pairs sampled from the current policy at each step and scored by an Oracle
            in memory (:class:`online.options.OnlineOptions`; the data gives prompt batches,
            ``data.prompts_only``), with this objective's own loss. None: the data's pairs.
    """

    needs = Needs()
    # False where the loss is not a mean of per-pair losses (the objective overrides batch_loss).
    sums_over_pairs = True
    # The scale of the Oracle margins a distilling objective regresses onto (set by those objectives).
    oracle_target: OracleTarget | None = None
    # Frozen models rebuilt at start, never trained: kept out of checkpoints (ReferenceModule adds its reference).
    frozen_models: tuple[str, ...] = ("online_start",)
    # The starting policy is at hand for the online KL estimate (a reference): no copy is kept for it.
    has_start = False

    def __init__(
        self,
        model: str,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        average_logps: bool = False,
        gradient_checkpointing: bool = False,
        reward_head_seed: int | None = None,
        trust_remote_code: bool = False,
        disable_dropout: bool = True,
        lora: dict[str, Any] | None = None,
        chunked_head: bool | None = None,
        pack_sequences: bool = True,
        online: OnlineOptions | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.policy: CausalLMWithRewardHead | None = None
        # A checkpoint's hyperparameters hold the options as a dict (on_save_checkpoint).
        self.online = OnlineOptions(**online) if isinstance(online, dict) else online
        self.online_source = None  # online.source.OnlineSource, built in setup
        self.online_start: CausalLMWithRewardHead | None = None  # the starting policy, for the KL estimate

    # -- the contract -------------------------------------------------------------------

    def pair_loss(self, batch: dict[str, Tensor], out: PairOutputs) -> PairLoss:
        """The loss of each pair ``[B]`` and what to log beside it. Pair ``b``'s loss may read the whole
        of ``batch`` (lengths, reference log-probs, Oracle scores) but only pair ``b`` of ``out``: the
        fused LM head evaluates it a chunk of pairs at a time. Implemented by every objective."""
        raise NotImplementedError

    def batch_loss(self, batch: dict[str, Tensor], out: PairOutputs, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch's loss (a scalar) and what to log: the mean of :meth:`pair_loss`. An objective whose
        loss is not such a mean overrides this instead of :meth:`pair_loss` and sets ``sums_over_pairs`` False."""
        result = self.pair_loss(batch, out)
        return mean_over_pairs(result.loss), result.logged

    def epoch_metrics(self, batch: dict[str, Tensor], out: PairOutputs, stage: str) -> dict[str, Any]:
        """Metrics with state over the epoch (torchmetrics), updated once per step; none here."""
        return {}

    def prepare_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with what the step computes once before its forward: the Oracle scores at the
        target's scale (a live reference's log-probs, in :class:`ReferenceModule`)."""
        return self.oracle_target.scaled(batch) if self.oracle_target is not None else batch

    def training_target(self) -> dict[str, Any] | None:
        """What a distilling student was trained against (the Oracle margins' scale), for checkpoints
        and exports; None for the other objectives."""
        return self.oracle_target.record() if self.oracle_target is not None else None

    # -- set-up -------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy = policy_setup.build_policy(
            hp.model, reward_head=self.needs.reward_head, reward_head_seed=hp.reward_head_seed,
            trust_remote_code=hp.trust_remote_code, disable_dropout=hp.disable_dropout,
            gradient_checkpointing=hp.gradient_checkpointing, lora_config=hp.lora,
        )
        self._matrices = policy_setup.matrix_ids(self.policy)
        if self.online is not None and self.online.kl_every_n_steps and not self.has_start and self.hparams.lora is None:
            self.online_start = frozen(CausalLMWithRewardHead(copy.deepcopy(self.policy.lm)))

    def check_data(self, datamodule) -> None:
        """Raise a :class:`UserError` now, before any model loads or data tokenizes, when the data
        module does not provide what this objective reads."""
        hparams = getattr(datamodule, "hparams", {})
        prompts_only = bool(hparams.get("prompts_only", False))
        if self.online is not None and not prompts_only:
            raise SettingError("model.online samples its pairs from prompt batches: set --data.prompts_only true")
        if self.online is None and prompts_only:
            raise SettingError("data.prompts_only gives prompts without pairs, which only the online mode trains on: "
                               "set --model.online.judge to the Oracle that scores the samples")
        columns = getattr(datamodule, "columns", None)
        if self.online is None and self.needs.oracle_scores and columns is not None and columns.chosen_score is None:
            raise missing_scores_error(type(self).__name__)

    def setup(self, stage: str) -> None:
        if self.online is not None:
            self.setup_online()
        elif stage == "fit" and self.needs.oracle_scores:  # online scores come from the judge, one per response
            self.check_score_shape(self.trainer.datamodule)
        if stage == "fit" and self.oracle_target is not None:
            self.oracle_target.fit_to(self.trainer.datamodule)
            for logger in self.trainer.loggers:
                logger.log_hyperparams(self.training_target())

    def check_score_shape(self, data: ExampleColumns) -> None:
        """Raise a :class:`UserError` once the data has loaded when its Oracle scores are not the shape this
        objective reads (one number per response, or an ensemble's list), naming the columns."""
        scores = data.column("train", "chosen_score")
        dims = 2 if isinstance(scores[0], (list, tuple)) else 1
        if dims != self.needs.oracle_scores:
            columns = getattr(data, "columns", None)
            named = f" ({columns.chosen_score}, {columns.rejected_score})" if columns is not None else ""
            found = f"a list of {len(scores[0])} numbers" if dims == 2 else "one number"
            raise SettingError(f"the Oracle score columns{named} hold {found} per response, and "
                               f"{type(self).__name__} {SCORE_SHAPE_ERRORS[self.needs.oracle_scores]}")

    # -- online ---------------------------------------------------------------------------

    def setup_online(self) -> None:
        """Check the online mode can run under this strategy and with this objective, then build its source."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
            raise SettingError(f"the online mode cannot sample under {type(strategy).__name__} with sharded "
                               "parameters (each process holds a shard; generating needs them whole): use DDP or "
                               "DeepSpeed ZeRO-2")
        if self.oracle_target is not None and self.oracle_target.normalization == "std":
            raise SettingError("target_normalization std measures Δr* over the training pairs before training, and "
                               "online pairs are sampled during it: use --model.target_normalization none")
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(
            self.hparams.model, trust_remote_code=self.hparams.trust_remote_code)
        # The prompts are cut as the data's pairs are: one budget, the data module's.
        max_prompt_length = getattr(datamodule, "hparams", {}).get("max_prompt_length", DEFAULT_MAX_PROMPT_LENGTH)
        self.start_online(tokenizer, strategy.root_device, max_prompt_length)

    def start_online(self, tokenizer, device: torch.device, max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH) -> None:
        """Build the online source: :meth:`make_sampler`'s sampler (prompts cut to ``max_prompt_length``
        tokens), the judge on ``device``, the seed (``online.seed``, else the run's ``seed_everything``)."""
        options = self.online
        seed = options.seed if options.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        judge = load_judge(options.judge, device=str(device), trust_remote_code=self.hparams.trust_remote_code,
                           progress=False)  # a bar at every step would bury the training's own
        sampler = self.make_sampler(tokenizer, max_prompt_length)
        self.online_source = OnlineSource(options, sampler, judge, tokenizer.pad_token_id, seed)

    def make_sampler(self, tokenizer, max_prompt_length: int):
        """The sampling backend (:class:`online.sampling.Sampler`): Hugging Face ``generate``."""
        return GenerateSampler(tokenizer, max_prompt_length)

    @contextlib.contextmanager
    def starting_policy(self) -> Iterator[CausalLMWithRewardHead | None]:
        """The starting policy, for the online KL estimate: the base model with LoRA (adapters off),
        else the frozen copy kept for it (None with ``online.kl_every_n_steps`` 0)."""
        if self.hparams.lora is not None:
            with lora.adapters_disabled(self.policy) as base:
                yield base
        else:
            yield self.online_start

    def online_batch(self, batch: dict[str, Any], stage: str, batch_idx: int):
        """Sample, score and pair this step's prompts (:meth:`online.source.OnlineSource.step`); each
        draw from the seed, the stage, the step (and batch) and the rank, so a resumed run draws alike."""
        if stage == "train":
            loop = self.trainer.fit_loop if self._trainer is not None else None
            draw = (stage, self.global_step, loop.total_batch_idx if loop is not None else batch_idx)
        else:
            draw = (stage, self.global_step, batch_idx)
        return self.online_source.step(self.policy.lm, batch, *draw, self.global_rank)

    def log_online(self, step, out: PairOutputs | None, stage: str) -> None:
        """Log what a user watches of the step's sampling (``{stage}/online/...``, :func:`online.source.step_metrics`),
        with the KL estimate to the starting policy every ``kl_every_n_steps`` training steps (and every
        validation batch); every ``log_samples_every_n_steps`` training steps, a few samples to
        ``samples.jsonl`` in the logger's folder and to loggers that log text."""

        n = len(step.pairs.chosen)
        logps = (out.chosen_logps[:n], out.rejected_logps[:n]) if out is not None and n else (None, None)
        metrics = step_metrics(step, *logps)
        pad = self.online_source.pad_token_id
        kl_every = self.online.kl_every_n_steps
        if kl_every and (stage != "train" or self.global_step % kl_every == 0):
            with torch.no_grad():
                policy_logps = sample_logps(self.policy, step.samples, pad)
                with self.starting_policy() as start:
                    if start is not None:
                        metrics["kl"] = (policy_logps - sample_logps(start, step.samples, pad)).mean()
        on_step = stage == "train"
        if not on_step:
            # An epoch's means are all-reduced key by key at its end: every process must log the same
            # keys, so one that had no pair in the whole epoch still adds its pair metrics, at weight 0.
            metrics = {name: torch.zeros(()) for name in PAIR_METRICS} | metrics
        for name, value in metrics.items():
            weight = n if name in PAIR_METRICS else len(step.samples.prompts)  # pair metrics: means over pairs
            self.log(f"{stage}/online/{name}", value.to(self.device), on_step=on_step, on_epoch=not on_step,
                     batch_size=weight, sync_dist=not on_step)
        every = self.online.log_samples_every_n_steps
        if stage != "train" or not every or self.global_step % every or self._trainer is None:
            return
        log_dir = self.trainer.log_dir  # broadcast from rank 0: every process asks, or rank 0 waits there alone
        if not self.trainer.is_global_zero:
            return
        rows = sample_records(step, self.global_step)
        if log_dir is not None:
            append_records(Path(log_dir) / SAMPLES_FILE, rows)
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key=f"{stage}/online/samples", columns=list(rows[0]),
                                data=[[str(v) for v in row.values()] for row in rows], step=self.global_step)

    def on_fit_start(self) -> None:
        device_placement.keep_reward_head_fp32(self.policy.reward_head, self.trainer)
        device_placement.metrics_to_device(self, self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        target = self.training_target()
        if target is not None:
            checkpoint[TRAINING_TARGET_KEY] = target
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k.split(".", 1)[0] not in self.frozen_models}
        if self.online is not None:
            # Checkpoints load weights-only: plain types, not the options' class.
            checkpoint.get("hyper_parameters", {})["online"] = dataclasses.asdict(self.online)
            if self.online_source is not None:
                checkpoint[ONLINE_SOURCE_KEY] = self.online_source.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.oracle_target is not None and TRAINING_TARGET_KEY in checkpoint:
            self.oracle_target.restore(checkpoint[TRAINING_TARGET_KEY])
        for name in self.frozen_models:
            model = getattr(self, name, None)
            if model is not None:
                checkpoint["state_dict"].update({f"{name}.{k}": v for k, v in model.state_dict().items()})
        if self.online_source is not None and ONLINE_SOURCE_KEY in checkpoint:
            self.online_source.load_state_dict(checkpoint[ONLINE_SOURCE_KEY])

    def on_validation_start(self) -> None:
        device_placement.metrics_to_device(self, self.trainer)

    def on_train_start(self) -> None:
        reliability.warn_if_resume_repeats_an_epoch(self.trainer)

    def configure_optimizers(self):
        hp = self.hparams
        return optimization.adamw_with_cosine_schedule(
            list(self.policy.parameters()), self._matrices, self.trainer, learning_rate=hp.learning_rate,
            weight_decay=hp.weight_decay, betas=hp.adam_betas, warmup_steps=hp.warmup_steps,
            fused=optimization.fused_adamw_allowed(self.device, self.trainer),
        )

    # -- forward ------------------------------------------------------------------------

    def head_settings(self, model: CausalLMWithRewardHead, stage: str | None = None) -> HeadSettings:
        """How ``model``'s forward goes through the LM head; fused with the loss at a step that may fuse it
        (:meth:`step_may_fuse`), where the chunked head is never slower (measured) at any vocabulary."""
        hp = self.hparams
        return HeadSettings(
            average=hp.average_logps, chunk_rows=heads.head_chunk_rows(model.lm, hp.chunked_head), packed=hp.pack_sequences,
            fused_chunk_rows=heads.head_chunk_rows(model.lm, True) if stage is not None and self.step_may_fuse(stage) else None,
        )

    def forward_pairs(self, batch: dict[str, Tensor], model: CausalLMWithRewardHead | None = None) -> PairOutputs:
        """One forward of ``model`` (default: the policy) over ``[chosen; rejected]``, split per pair."""
        model = self.policy if model is None else model
        return forward_pairs(model, batch, self.needs, self.head_settings(model))[1]

    def step_may_fuse(self, stage: str) -> bool:
        """Whether this step may compute the loss fused with the LM head: a training step (the fused head
        computes the head's gradients itself, so it needs a graph to give them to and whole parameters,
        not a sharded strategy's) of an objective whose loss is a mean over pairs, unless switched off.
        It then fuses where the model's head allows (:meth:`CausalLMWithRewardHead.fuses_head`). With
        ``chunked_head: null`` the device's default head decides (:func:`heads.head_default`)."""
        chunked = self.hparams.chunked_head
        if stage != "train" or not torch.is_grad_enabled() or not self.sums_over_pairs or chunked is False:
            return False
        if chunked is None and not heads.head_default(self.device.type).fuse_training:
            return False
        return self._trainer is None or not isinstance(self.trainer.strategy, (DeepSpeedStrategy, FSDPStrategy))

    def loss_and_outputs(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, PairOutputs, dict[str, Tensor]]:
        """The step's loss, the policy's outputs and what to log, from the one loss definition."""
        batch = self.prepare_batch(batch)
        settings = self.head_settings(self.policy, stage)
        loss, out = forward_pairs(self.policy, batch, self.needs, settings, lambda o: self.pair_loss(batch, o).loss)
        if loss is None:
            loss, logged = self.batch_loss(batch, out, stage)
        else:
            logged = self.pair_loss(batch, out).logged  # the values of the whole batch, once it is complete
        return loss, out, {**logged, **self.epoch_metrics(batch, out, stage)}

    # -- steps --------------------------------------------------------------------------

    def _step(self, batch: dict[str, Tensor], stage: str, batch_idx: int) -> Tensor | None:
        online = None
        if self.online is not None:
            online = self.online_batch(batch, stage, batch_idx)
            batch = online.batch
            if batch is None:  # every prompt tied and no offline pairs (logged: pairs 0, ties_dropped)
                self.log_online(online, None, stage)
                # Training: an optimizer step on zero gradients, as every other process steps (AdamW still
                # applies its decoupled weight decay and the momentum of earlier steps: docs/method.md).
                return zero_loss(self.parameters()) if stage == "train" else None
        loss, out, logged = self.loss_and_outputs(batch, stage)
        metrics = {"loss": loss, **logged, "chosen_logps": out.chosen_logps}
        if out.rejected_logps is not None:
            metrics["rejected_logps"] = out.rejected_logps
            metrics["implicit_accuracy"] = (out.chosen_logps > out.rejected_logps).float()
        on_step = stage == "train"
        batch_size = batch["chosen_input_ids"].shape[0]
        for name, value in metrics.items():
            if isinstance(value, Tensor):
                value = value.detach().float().mean() if value.dim() else value.detach()
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", on_step=on_step, on_epoch=not on_step,
                     batch_size=batch_size, sync_dist=not on_step)
        if online is not None:
            self.log_online(online, out, stage)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)
