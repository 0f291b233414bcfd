"""LightningModules: one shared base and a thin subclass per objective.

The base owns everything objectives have in common: building the model (in
``configure_model``, so sharded strategies can create parameters in place), one forward over
chosen and rejected concatenated, response-token log-probs, logging, and AdamW with a cosine
schedule and linear warm-up. A subclass declares what it needs (rejected responses, a reward
head) and maps the forward's outputs to a loss with one function from :mod:`losses`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric, PearsonCorrCoef
from transformers import get_cosine_schedule_with_warmup

from drdo_lightning import lora, losses
from drdo_lightning.errors import UserError
from drdo_lightning.models import CausalLMWithRewardHead, head_chunk_rows, prompt_prediction_mask, remove_dropout


class PairOutputs(NamedTuple):
    """Per-sequence quantities of one batch; ``None`` where the objective does not need them."""

    chosen_logps: Tensor  # z_w = log pi(y_w|x) over response tokens (sum, or mean with average_logps)
    rejected_logps: Tensor | None
    chosen_rewards: Tensor | None  # r̂(x, y_w) from the reward head
    rejected_rewards: Tensor | None
    # sum_t log(1 - p(y_l,t)) (mean with average_logps), only for objectives that ask for it
    rejected_token_unlikelihood: Tensor | None = None
    chosen_lengths: Tensor | None = None  # response tokens of y_w (at least 1), as averages divide by
    # sum of the prompt tokens' log-probs and their count, for an NLL over the whole chosen sequence
    chosen_prompt_logps: Tensor | None = None
    chosen_prompt_lengths: Tensor | None = None


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
            loss where it is a sum over pairs (:func:`logprobs.fused_head_loss`, each chunk's
            gradients computed in the forward pass), else recomputing each chunk's logits in
            backward (:func:`logprobs.chunked_token_logps`, one more head matrix product per step).
            ``None``: on for vocabularies of 100k tokens and more, and at any vocabulary for a
            training step that fuses (measured never slower than the one-piece head, at 32k and 128k).
        pack_sequences: Run the model on each padded batch's sequences packed end to end, position
            ids restarting per sequence (:mod:`drdo_lightning.packing`), instead of padded rows: the
            same values without computing on padding (on long-tailed lengths 1.5x the useful tokens/s
            of padded batches, measured). Models that cannot keep packed sequences apart (OPT in
            transformers 5) train padded, with a notice.
    """

    uses_rejected: bool = True
    uses_reward_head: bool = False
    uses_token_unlikelihood: bool = False
    uses_prompt_logps: bool = False

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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.policy: CausalLMWithRewardHead | None = None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        # A forked RNG seeds the head alone and leaves the global streams (data order) as they were.
        with torch.random.fork_rng(enabled=self.hparams.reward_head_seed is not None):
            if self.hparams.reward_head_seed is not None:
                torch.manual_seed(self.hparams.reward_head_seed)
            self.policy = CausalLMWithRewardHead.from_pretrained(
                self.hparams.model,
                reward_head=self.uses_reward_head,
                trust_remote_code=self.hparams.trust_remote_code,
            ).train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        if self.hparams.disable_dropout:
            remove_dropout(self.policy)
        if self.hparams.gradient_checkpointing:
            self.policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.hparams.lora is not None:  # after remove_dropout: the adapters' dropout is as asked
            self.policy.lm = lora.add_adapters(self.policy.lm, self.hparams.lora)
        # Matrices get weight decay. Told apart now, by shape: FSDP later flattens every parameter
        # into a 1-D shard (ZeRO-3 already has, but keeps the real shape in ds_shape).
        self._matrices = {id(p) for p in self.policy.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2}

    # Whether the objective reads Oracle reward columns of the data.
    needs_oracle_scores = False

    def check_data(self, datamodule) -> None:
        """Raise a :class:`UserError` now, before any model loads or data tokenizes, when the data
        module does not provide what this objective reads."""
        if self.needs_oracle_scores and getattr(datamodule, "columns", None) is not None and datamodule.columns.chosen_score is None:
            raise missing_scores_error(type(self).__name__)

    def on_fit_start(self) -> None:
        # "bf16-true" casts every parameter to bf16. The reward head is a few thousand numbers that
        # regress real-valued targets, and bf16 would round its small updates away: keep it fp32
        # (the optimizer's state for it follows, as it is created at the first step). DeepSpeed
        # keeps fp32 master weights of its own and owns the parameters' storage.
        head = self.policy.reward_head
        if head is not None and self.trainer.precision.endswith("-true") and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            head.float()
        self.metrics_to_device()

    def on_validation_start(self) -> None:
        self.metrics_to_device()

    def metrics_to_device(self) -> None:
        """Put every torchmetrics state on the strategy's device. Under DeepSpeed ZeRO-3 nothing moves
        the module as a whole (DeepSpeed places the partitioned parameters itself), so states built
        on the CPU would meet CUDA inputs at the first update."""
        if self._trainer is None:
            return
        device = self.trainer.strategy.root_device
        for module in self.modules():
            if isinstance(module, Metric) and module.device != device:
                module.to(device)

    # -- forward ------------------------------------------------------------------------

    @property
    def sides(self) -> tuple[str, ...]:
        return ("chosen", "rejected") if self.uses_rejected else ("chosen",)

    def forward_pairs(self, batch: dict[str, Tensor], model: CausalLMWithRewardHead | None = None) -> PairOutputs:
        """One forward of ``model`` (default: the policy) over ``[chosen; rejected]`` (``[2B, T]``),
        split per side."""
        model = self.policy if model is None else model
        inputs, to_pairs = self._pair_inputs(batch)
        # Logits only at response positions (models.CausalLMWithRewardHead.sequence_logps).
        return to_pairs(model.sequence_logps(*inputs, **self._logps_options(model, self.hparams.chunked_head)))

    def forward_pairs_with_loss(
        self, batch: dict[str, Tensor], loss_terms: Callable[[PairOutputs], Tensor]
    ) -> tuple[Tensor, PairOutputs] | None:
        """The policy's :meth:`forward_pairs` and the loss ``loss_terms(out).sum()`` in one pass through
        the LM head fused with the loss (:meth:`CausalLMWithRewardHead.loss_and_sequence_logps`; its
        log-probs then carry no gradient); None, computing nothing, where the head is not chunked or
        the model's head cannot be fused."""
        if self.hparams.chunked_head is False or not self.policy.fuses_head(batch["chosen_input_ids"]):
            return None
        inputs, to_pairs = self._pair_inputs(batch)
        # Fused, the chunked head is never slower (measured): on at any vocabulary unless switched off.
        loss, values = self.policy.loss_and_sequence_logps(
            *inputs, lambda values: loss_terms(to_pairs(values)), groups=batch["chosen_input_ids"].shape[0],
            **self._logps_options(self.policy, chunked=True),
        )
        return loss, to_pairs(values)

    def _logps_options(self, model: CausalLMWithRewardHead, chunked: bool | None) -> dict[str, Any]:
        return dict(
            average=self.hparams.average_logps, token_unlikelihood=self.uses_token_unlikelihood,
            prompt_logps=self.uses_prompt_logps, chunk_rows=head_chunk_rows(model.lm, chunked),
            packed=self.hparams.pack_sequences,
        )

    def _pair_inputs(self, batch: dict[str, Tensor]) -> tuple[tuple[Tensor, Tensor, Tensor], Callable[[tuple], PairOutputs]]:
        """The model's inputs ``[chosen; rejected]`` and the map from its per-sequence values to :class:`PairOutputs`."""
        input_ids = torch.cat([batch[f"{s}_input_ids"] for s in self.sides])
        attention_mask = torch.cat([batch[f"{s}_attention_mask"] for s in self.sides])
        labels = torch.cat([batch[f"{s}_labels"] for s in self.sides])
        lengths = (labels[:, 1:] != -100).sum(-1).clamp(min=1)
        n = batch["chosen_input_ids"].shape[0]
        prompt_lengths = prompt_prediction_mask(attention_mask[:n], labels[:n]).sum(-1) if self.uses_prompt_logps else None

        def to_pairs(values: tuple) -> PairOutputs:
            logps, rewards, *extra = values
            unlikelihood = extra.pop(0) if self.uses_token_unlikelihood else None
            prompt = extra.pop(0) if self.uses_prompt_logps else None
            return PairOutputs(
                chosen_logps=logps[:n],
                rejected_logps=logps[n:] if self.uses_rejected else None,
                chosen_rewards=rewards[:n] if rewards is not None else None,
                rejected_rewards=rewards[n:] if rewards is not None and self.uses_rejected else None,
                rejected_token_unlikelihood=unlikelihood[n:] if unlikelihood is not None else None,
                chosen_lengths=lengths[:n],
                chosen_prompt_logps=prompt[:n] if prompt is not None else None,
                chosen_prompt_lengths=prompt_lengths,
            )

        return (input_ids, attention_mask, labels), to_pairs

    def chosen_nll(self, out: PairOutputs, reduction: str) -> Tensor:
        """The chosen responses' NLL per pair (:func:`losses.chosen_nll`: its sum is the batch's NLL),
        over their prompts too when the objective asked for prompt log-probs (``uses_prompt_logps``)."""
        total = out.chosen_logps * out.chosen_lengths if self.hparams.average_logps else out.chosen_logps
        count = out.chosen_lengths
        if out.chosen_prompt_logps is not None:
            total, count = total + out.chosen_prompt_logps, count + out.chosen_prompt_lengths
        return losses.chosen_nll_terms(total, count, reduction)

    def loss_terms(self, batch: dict[str, Tensor]) -> Callable[[PairOutputs], Tensor] | None:
        """The training loss as a sum over pairs: a function of the batch's outputs returning one term
        per pair ``[B]``, each depending on its own pair's outputs only (and on what the batch fixes:
        lengths, reference log-probs, Oracle scores). The fused LM head
        (:meth:`forward_pairs_with_loss`) needs this form. None where the loss is not such a sum."""
        return None

    def objective(self, batch: dict[str, Tensor], out: PairOutputs, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the scalar loss and extra metrics for this batch. Implemented by subclasses."""
        raise NotImplementedError

    def prepare_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with whatever the step computes once before its forward (nothing here)."""
        return batch

    def _check_fused_loss(self, whole: Tensor, fused: Tensor) -> None:
        """A fused step trains on :meth:`loss_terms`; :meth:`objective` must give the same loss (a
        subclass that changes one and not the other would otherwise train on a loss it did not mean)."""
        if not torch.allclose(whole.detach().float(), fused.detach().float(), rtol=1e-4, atol=1e-6, equal_nan=True):
            raise UserError(
                f"{type(self).__name__}.objective gives a loss of {whole.item():.6g}, but the sum of its loss_terms is "
                f"{fused.item():.6g}: a step with the LM head fused to the loss trains on loss_terms. Give loss_terms the "
                "same loss, or set --model.chunked_head false to train on objective's loss unfused."
            )

    def _step_fuses_head(self, stage: str) -> bool:
        # The fused head computes the head's gradients itself: it needs whole parameters (not a
        # sharded strategy's) and a graph to give them to (training).
        if stage != "train" or not torch.is_grad_enabled():
            return False
        return self._trainer is None or not isinstance(self.trainer.strategy, (DeepSpeedStrategy, FSDPStrategy))

    # -- steps --------------------------------------------------------------------------

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        batch = self.prepare_batch(batch)
        terms = self.loss_terms(batch) if self._step_fuses_head(stage) else None
        fused = self.forward_pairs_with_loss(batch, terms) if terms is not None else None
        if fused is None:
            out = self.forward_pairs(batch)
            loss, metrics = self.objective(batch, out, stage)
        else:
            loss, out = fused
            whole, metrics = self.objective(batch, out, stage)  # its metrics; the loss with gradients is the fused one
            self._check_fused_loss(whole, loss)
        metrics = {"loss": loss, **metrics, "chosen_logps": out.chosen_logps.mean()}
        if out.rejected_logps is not None:
            metrics["rejected_logps"] = out.rejected_logps.mean()
            metrics["implicit_accuracy"] = (out.chosen_logps > out.rejected_logps).float().mean()
        on_step = stage == "train"
        batch_size = batch["chosen_input_ids"].shape[0]
        for name, value in metrics.items():
            self.log(
                f"{stage}/{name}",
                value.detach() if isinstance(value, Tensor) else value,
                prog_bar=name == "loss",
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                sync_dist=not on_step,
            )
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_start(self) -> None:
        # Lightning 2.6 restarts a max_steps-bounded run from a checkpoint written as an epoch ended
        # (ModelCheckpoint's per-epoch saving) by ending that epoch a second time: the epoch count
        # runs one ahead, so the sampler draws the following epoch's order and max_epochs comes early.
        trainer = self.trainer
        if trainer.fit_loop.restarted_on_epoch_end and trainer.max_steps != -1:
            rank_zero_warn(
                f"resuming with --trainer.max_steps {trainer.max_steps} from a checkpoint written as epoch "
                f"{trainer.current_epoch} ended: Lightning counts that epoch twice, so this run goes on with the "
                "data order of the epoch after next and reaches max_epochs one epoch early; it will not match an "
                "uninterrupted run. Runs bounded by max_epochs alone, and checkpoints saved by step "
                "(ModelCheckpoint every_n_train_steps), resume exactly."
            )

    # -- optimisation -------------------------------------------------------------------

    def _fused_adamw(self) -> bool:
        """Fused AdamW: one kernel over all tensors instead of a loop of small ops (7x less optimizer time
        on CPU; TRL's default too). Not under mixed precision (16 or bf16), where Lightning's AMP plugin
        refuses to clip the gradients of an optimizer that could unscale them itself, nor under DeepSpeed,
        whose engine wraps the optimizer."""
        return (
            self.device.type in ("cpu", "cuda")
            and not self.trainer.precision.endswith("-mixed")
            and not isinstance(self.trainer.strategy, DeepSpeedStrategy)
        )

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.policy.parameters():
            if param.requires_grad:
                (decay if id(param) in self._matrices else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            # No empty group (LoRA without a reward head trains matrices only): DeepSpeed drops empty
            # groups, and the schedule, built on the groups given here, would no longer match.
            [group for group in groups if group["params"]],
            lr=self.hparams.learning_rate,
            betas=self.hparams.adam_betas,
            fused=self._fused_adamw(),
        )
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, self.hparams.warmup_steps, max(1, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def missing_scores_error(objective: str) -> UserError:
    return UserError(
        f"{objective} distils Oracle rewards and the data has none: set --data.chosen_score_column and "
        "--data.rejected_score_column to the columns that `python -m drdo_lightning score` adds "
        "(oracle_chosen, oracle_rejected)"
    )


def _oracle_scores(batch: dict[str, Tensor], objective: str) -> tuple[Tensor, Tensor]:
    if "chosen_score" not in batch:
        raise missing_scores_error(objective)
    return batch["chosen_score"], batch["rejected_score"]


class SFT(PreferenceModule):
    """Supervised fine-tuning on the chosen responses: ``-mean z_w``.

    With ``average_logps=True`` (the SFT recipe's setting) this is the mean token negative
    log-likelihood of each response, averaged over responses. Dropout stays as the model's config
    sets it, as in ordinary fine-tuning (``disable_dropout=False``).
    """

    uses_rejected = False

    def __init__(self, model: str, disable_dropout: bool = False, **kwargs) -> None:
        super().__init__(model, disable_dropout=disable_dropout, **kwargs)

    def loss_terms(self, batch):
        return lambda out: -out.chosen_logps / out.chosen_logps.numel()

    def objective(self, batch, out, stage):
        return self.loss_terms(batch)(out).sum(), {}


class OracleRewardModel(PreferenceModule):
    """The Oracle: a causal LM with a reward head trained with paper Eq. 5.

    Args:
        alpha: Weight ``alpha_O`` of the language-modelling regulariser (paper: 0.01).
    """

    uses_reward_head = True

    def __init__(self, model: str, alpha: float = 0.01, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()

    def loss_terms(self, batch):
        return lambda out: losses.oracle_loss(
            out.chosen_rewards, out.rejected_rewards, out.chosen_logps, alpha=self.hparams.alpha
        ) / out.chosen_logps.numel()

    def objective(self, batch, out, stage):
        loss = self.loss_terms(batch)(out).sum()
        margin = out.chosen_rewards - out.rejected_rewards
        return loss, {"reward_accuracy": (margin > 0).float().mean(), "reward_margin": margin.mean()}


class DRDO(PreferenceModule):
    """The DRDO student (paper Eq. 6): distil the Oracle's reward margins and learn the
    preference with a focal log-unlikelihood; no reference model.

    Args:
        alpha: Weight of the preference term (paper: 0.1).
        gamma: Focal exponent on ``(1 - p_w)`` (paper: 2).
        detach_focal: Treat the focal weight as a constant (an extension; the paper
            differentiates through it).
        distill_weight: Weight of the distillation term (paper: 1, unweighted); 0 leaves the
            preference term alone, for ablations.
        preference_form: The preference term's log-likelihood (:func:`losses.preference_log_term`):
            ``paper``, Eq. 6 as printed, ``-alpha f log(pi_w / (1 - pi_l))``, whose unlikelihood part
            raises ``pi(y_l|x)``; ``corrected``, ``-alpha f [log pi_w + log(1 - pi_l)]``, which lowers
            it; ``token_unlikelihood``, ``-alpha f [log pi_w + sum_t log(1 - p(y_l,t))]``, the same per
            token of the rejected response.
        balance_terms: Weight the two terms so that their gradients on the language model have the
            same norm (:func:`losses.balance_weights`): at the start the distillation gradient is
            several times larger and sets the direction of the early steps. Each training step
            measures both norms (two extra backward passes; one device or DDP, not DeepSpeed or
            FSDP) and keeps a running mean of each; the weights are logged as
            ``distill_balance_weight`` and ``preference_balance_weight``. ``alpha`` and
            ``distill_weight`` then cancel out (each term is linear in its weight).
        balance_momentum: Momentum of the running means of the gradient norms.
        distill_form: The distillation term (:func:`losses.reward_distillation`): ``mse``, the
            paper's squared regression of the reward margins; ``bt_soft``, the cross-entropy between
            the Oracle's Bradley-Terry probability ``sigmoid(Δr*)`` and the student's ``sigmoid(Δr̂)``.
    """

    needs_oracle_scores = True

    uses_reward_head = True

    def __init__(
        self,
        model: str,
        alpha: float = 0.1,
        gamma: float = 2.0,
        detach_focal: bool = False,
        distill_weight: float = 1.0,
        preference_form: Literal["paper", "corrected", "token_unlikelihood"] = "paper",
        balance_terms: bool = False,
        balance_momentum: float = 0.9,
        distill_form: Literal["mse", "bt_soft"] = "mse",
        **kwargs,
    ) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        if distill_form not in losses.DISTILL_FORMS:
            raise ValueError(f"distill_form must be one of {losses.DISTILL_FORMS}, not {distill_form!r}")
        if preference_form not in losses.PREFERENCE_FORMS:
            raise ValueError(f"preference_form must be one of {losses.PREFERENCE_FORMS}, not {preference_form!r}")
        if balance_terms and (alpha == 0 or distill_weight == 0):
            raise ValueError("balance_terms needs both terms: alpha and distill_weight must be non-zero")
        if balance_terms:
            # Running means of the distillation's and the preference's gradient norms (0: none yet);
            # buffers, so a resumed run continues with them.
            self.register_buffer("term_grad_norms", torch.zeros(2))
        # Epoch-level correlation of student and Oracle reward margins, one state per stage.
        self.train_reward_corr, self.val_reward_corr = PearsonCorrCoef(), PearsonCorrCoef()

    @property
    def uses_token_unlikelihood(self) -> bool:
        return self.hparams.preference_form == "token_unlikelihood"

    def on_fit_start(self) -> None:
        # The norms come from autograd on whole parameters, which sharded strategies do not hold.
        if self.hparams.balance_terms and isinstance(self.trainer.strategy, (DeepSpeedStrategy, FSDPStrategy)):
            raise ValueError("balance_terms needs whole parameters on each process: train on one device or with DDP")
        super().on_fit_start()

    def _balance_weights(self, distillation: Tensor, preference: Tensor, stage: str) -> tuple[Tensor, Tensor]:
        """``(w_d, w_p)`` from the running gradient norms, updated first at a training step."""
        if stage == "train":
            params = [p for p in self.policy.lm.parameters() if p.requires_grad]
            measured = torch.stack([_grad_norm(term, params) for term in (distillation, preference)])
            if self._trainer is not None:  # every process weights its terms alike, as DDP averages their gradients
                measured = self.trainer.strategy.reduce(measured, reduce_op="mean")
            seen = self.term_grad_norms.gt(0).all()
            momentum = self.hparams.balance_momentum if seen else 0.0
            self.term_grad_norms.mul_(momentum).add_((1 - momentum) * measured)
        if not self.term_grad_norms.gt(0).all():  # nothing measured yet: the terms as they are
            return torch.ones((), device=self.device), torch.ones((), device=self.device)
        return losses.balance_weights(*self.term_grad_norms)

    def _terms(self, batch: dict[str, Tensor], out: PairOutputs) -> losses.DRDOTerms:
        oracle_chosen, oracle_rejected = _oracle_scores(batch, "DRDO")
        return losses.drdo_terms(
            out.chosen_logps,
            out.rejected_logps,
            out.chosen_rewards,
            out.rejected_rewards,
            oracle_chosen,
            oracle_rejected,
            alpha=self.hparams.alpha,
            gamma=self.hparams.gamma,
            detach_focal=self.hparams.detach_focal,
            distill_weight=self.hparams.distill_weight,
            preference_form=self.hparams.preference_form,
            rejected_token_unlikelihood=out.rejected_token_unlikelihood,
            distill_form=self.hparams.distill_form,
        )

    def loss_terms(self, batch):
        if self.hparams.balance_terms:  # the weights come from both terms' gradient norms over the whole batch
            return None
        return lambda out: self._terms(batch, out).loss / out.chosen_logps.numel()

    def objective(self, batch, out, stage):
        oracle_chosen, oracle_rejected = _oracle_scores(batch, "DRDO")
        terms = self._terms(batch, out)
        student_margin = (out.chosen_rewards - out.rejected_rewards).detach()
        corr = getattr(self, f"{stage}_reward_corr")
        corr(student_margin, (oracle_chosen - oracle_rejected).float())  # forward: batch value + epoch state
        metrics = {
            "distillation": terms.distillation.mean(),
            "preference": terms.preference.mean(),
            "p_chosen": terms.p_chosen.mean(),
            "reward_accuracy": (student_margin > 0).float().mean(),
            "reward_corr": corr,
        }
        if not self.hparams.balance_terms:
            return self.loss_terms(batch)(out).sum(), metrics
        distillation = self.hparams.distill_weight * terms.distillation.mean()
        w_distill, w_preference = self._balance_weights(distillation, metrics["preference"], stage)
        if stage == "train":  # validation only reuses the weights training set
            distill_norm, preference_norm = self.term_grad_norms.clone()  # the buffer moves on next step
            metrics.update(
                distill_balance_weight=w_distill,
                preference_balance_weight=w_preference,
                distill_grad_norm=distill_norm,
                preference_grad_norm=preference_norm,
            )
        return w_distill * distillation + w_preference * metrics["preference"], metrics


def _grad_norm(term: Tensor, params: list[Tensor]) -> Tensor:
    """Norm of ``term``'s gradient over ``params``, detached; the graph is kept for the step's own backward."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads if g is not None]))


# ---------------------------------------------------------------------------------------
# Baselines against a frozen reference policy


class ReferenceModule(PreferenceModule):
    """Shared base of DPO, IPO, distillation and e-DPO: adds a frozen reference policy.

    The reference is a frozen copy of the starting policy (no second download), or the model
    at ``reference_model``. With LoRA (``lora``) it is the policy itself with its adapters switched
    off, which computes the starting policy: no copy at all. With ``precompute_reference=True``
    its log-probs are computed once before training, attached to the data as
    ``ref_chosen_logps``/``ref_rejected_logps``, and cached beside the tokenized data (keyed by
    data, tokenizer, truncation and reference weights), so training holds one model in memory.

    Args:
        reference_model: Path or hub id of the reference; default: the starting ``model``.
        precompute_reference: Precompute reference log-probs instead of running the
            reference live.
    """

    def __init__(
        self, model: str, reference_model: str | None = None, precompute_reference: bool = False, **kwargs
    ) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        self.reference: CausalLMWithRewardHead | None = None

    def _load_reference(self) -> CausalLMWithRewardHead:
        reference = CausalLMWithRewardHead.from_pretrained(
            self.hparams.reference_model or self.hparams.model,
            reward_head=False,
            trust_remote_code=self.hparams.trust_remote_code,
        )
        return self._freeze(reference)

    @staticmethod
    def _freeze(model: CausalLMWithRewardHead) -> CausalLMWithRewardHead:
        model.requires_grad_(False)
        return model.eval()

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference is not None or self.hparams.precompute_reference or self._reference_is_base:
            return
        if hasattr(next(self.policy.parameters()), "ds_shape"):
            raise ValueError(
                "a live reference model is not supported under DeepSpeed ZeRO-3 (its parameters are sharded); "
                "use --model.precompute_reference true"
            )
        if self.hparams.reference_model is None:
            self.reference = self._freeze(CausalLMWithRewardHead(copy.deepcopy(self.policy.lm)))
        else:
            self.reference = self._load_reference()

    @property
    def _reference_is_base(self) -> bool:
        """The reference is the policy's base model, run with its adapters off."""
        return self.hparams.lora is not None and self.hparams.reference_model is None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.precompute_reference:
            self._attach_reference_logps(self.trainer.datamodule)

    def _reference_cache_file(self, datamodule) -> Path | None:
        data_cache = datamodule.cache_path()
        if data_cache is None:
            return None
        source = Path(self.hparams.reference_model or self.hparams.model)
        weights = sorted(source.glob("*.safetensors")) if source.is_dir() else []
        key = json.dumps(
            {
                "reference": str(source.resolve()) if source.exists() else str(source),
                "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
                "average_logps": self.hparams.average_logps,
            }
        )
        return data_cache / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    @torch.no_grad()
    def _compute_reference_logps(self, datamodule) -> dict[str, Tensor]:
        reference = self._load_reference().to(self.trainer.strategy.root_device)
        values = {}
        for split in ("train", "val"):
            if getattr(datamodule, f"{split}_dataset") is None:
                continue
            chunks = []
            for batch in datamodule.ordered_dataloader(split):
                batch = {k: v.to(self.trainer.strategy.root_device) for k, v in batch.items()}
                out = self.forward_pairs(batch, model=reference)
                chunks.append(torch.stack([out.chosen_logps, out.rejected_logps], dim=-1).float().cpu())
            values[split] = torch.cat(chunks)
        return values

    def _attach_reference_logps(self, datamodule) -> None:
        cache = self._reference_cache_file(datamodule)
        if cache is None or not cache.exists():
            if cache is None or self.trainer.is_global_zero:
                with torch.random.fork_rng():  # loading must not shift the seeded RNG streams of training
                    values = self._compute_reference_logps(datamodule)
                if cache is not None:
                    staging = cache.with_suffix(".tmp")
                    torch.save(values, staging)
                    staging.replace(cache)
            self.trainer.strategy.barrier("reference-logps")
        if cache is not None:
            values = torch.load(cache, weights_only=True)
        for split, logps in values.items():
            datamodule.add_columns(
                split, {"ref_chosen_logps": logps[:, 0].tolist(), "ref_rejected_logps": logps[:, 1].tolist()}
            )

    def prepare_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with the reference's log-probs as columns: a live reference runs once per step,
        whether the loss is then read per pair (the fused head) or whole."""
        if "ref_chosen_logps" in batch:
            return batch
        chosen, rejected = self.reference_logps(batch)
        return {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def reference_logps(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(z_w^ref, z_l^ref)``: precomputed columns when present, else a no-grad reference forward."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            if self.reference is not None:
                out = self.forward_pairs(batch, model=self.reference)
            elif self._reference_is_base:
                with lora.adapters_disabled(self.policy) as base:
                    out = self.forward_pairs(batch, model=base)
            else:
                raise RuntimeError("precompute_reference=True but the batch has no reference log-probs")
        return out.chosen_logps, out.rejected_logps

    # The reference is frozen and rebuilt from disk at start: keep it out of checkpoints.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("reference.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.reference is not None:
            checkpoint["state_dict"].update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})

    def margin_metrics(self, out: PairOutputs, ref: tuple[Tensor, Tensor], beta: float) -> dict[str, Tensor]:
        """DPO-style implicit rewards ``beta * (z - z_ref)`` and their accuracy and margin."""
        chosen = beta * (out.chosen_logps - ref[0]).detach()
        rejected = beta * (out.rejected_logps - ref[1]).detach()
        return {
            "reward_accuracy": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).mean(),
            "chosen_rewards": chosen.mean(),
            "rejected_rewards": rejected.mean(),
        }


class DPO(ReferenceModule):
    """Direct Preference Optimization (paper Eq. 3).

    Its variants (cDPO, rDPO, RPO) change only :meth:`pair_loss` or add a term.

    Args:
        beta: Inverse temperature of the implicit reward (paper: 0.1).
    """

    def __init__(self, model: str, beta: float = 0.1, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()

    def pair_loss(self, out: PairOutputs, ref: tuple[Tensor, Tensor]) -> Tensor:
        """The per-pair loss on the log-ratio margin ``h``: DPO's ``-log sigmoid(beta h)``."""
        return losses.dpo_loss(out.chosen_logps, out.rejected_logps, *ref, beta=self.hparams.beta)

    def loss_terms(self, batch):
        ref = self.reference_logps(batch)
        return lambda out: self.pair_loss(out, ref) / out.chosen_logps.numel()

    def objective(self, batch, out, stage):
        ref = self.reference_logps(batch)
        return self.loss_terms(batch)(out).sum(), self.margin_metrics(out, ref, self.hparams.beta)


class CDPO(DPO):
    """Conservative DPO (Mitchell 2023): DPO with label smoothing (:func:`losses.cdpo_loss`).

    Args:
        beta: Inverse temperature of the implicit reward.
        label_smoothing: ``eps``, the probability that a label is wrong; 0 is DPO.
    """

    def __init__(self, model: str, label_smoothing: float = 0.1, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        losses.check_noise_rate(label_smoothing, "label_smoothing")

    def pair_loss(self, out, ref):
        return losses.cdpo_loss(out.chosen_logps, out.rejected_logps, *ref, beta=self.hparams.beta,
                                label_smoothing=self.hparams.label_smoothing)


class RDPO(DPO):
    """Robust DPO (Chowdhury, Kini & Natarajan 2024): the unbiased DPO loss under a known flip rate
    (:func:`losses.rdpo_loss`; TRL's ``loss_type="robust"``).

    Args:
        beta: Inverse temperature of the implicit reward.
        flip_rate: ``eps < 0.5``, the rate at which labels are flipped; 0 is DPO.
    """

    def __init__(self, model: str, flip_rate: float = 0.1, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        losses.check_noise_rate(flip_rate, "flip_rate")

    def pair_loss(self, out, ref):
        return losses.rdpo_loss(out.chosen_logps, out.rejected_logps, *ref, beta=self.hparams.beta,
                                flip_rate=self.hparams.flip_rate)


class RPO(DPO):
    """DPO plus an NLL term on the chosen response (RPO, Pang et al. 2024; TRL's
    ``loss_type=["sigmoid", "sft"]``): ``DPO + nll_weight * NLL(y_w)``, which keeps the chosen
    response's likelihood from falling while the margin grows.

    Args:
        beta: Inverse temperature of the implicit reward.
        nll_weight: Weight of the NLL term (RPO: 1; TRL's ``loss_weights[1]``).
        nll_reduction: ``sequence``, the mean over pairs of each response's mean token NLL; ``token``,
            the mean over all chosen tokens of the batch, TRL's (:func:`losses.chosen_nll`).
    """

    def __init__(self, model: str, nll_weight: float = 1.0, nll_reduction: Literal["sequence", "token"] = "sequence",
                 **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()

    def objective(self, batch, out, stage):
        loss, metrics = super().objective(batch, out, stage)  # DPO's and the NLL: loss_terms is ours
        nll = self.chosen_nll(out, self.hparams.nll_reduction).sum()
        dpo_loss = loss - self.hparams.nll_weight * nll
        return loss, {**metrics, "dpo_loss": dpo_loss.detach(), "nll": nll.detach()}

    def loss_terms(self, batch):
        preference = super().loss_terms(batch)
        return lambda out: preference(out) + self.hparams.nll_weight * self.chosen_nll(out, self.hparams.nll_reduction)


class IPO(ReferenceModule):
    """Identity Preference Optimisation (Azar et al. 2023).

    ``((z_w - z_w^ref) - (z_l - z_l^ref) - 1/(2 tau))^2``, where ``z`` is by default the *mean*
    token log-prob of a response (``average_logps=True``), as in TRL's ``loss_type="ipo"``: the
    IPO authors advised TRL that the log-likelihoods be averaged, so that the fixed target margin
    ``1/(2 tau)`` means the same for a 10-token and a 300-token response. With summed log-probs
    (``average_logps=False``, the paper's formula read literally) the log-ratio margin grows with
    length and the same ``tau`` regularises long responses far less; keep that setting to compare
    with implementations that sum.

    Args:
        tau: Regularisation strength; the target log-ratio margin is ``1 / (2 tau)``.
        average_logps: Mean (default, TRL's convention) or sum of the response's token log-probs.
    """

    def __init__(self, model: str, tau: float = 0.1, average_logps: bool = True, **kwargs) -> None:
        super().__init__(model, average_logps=average_logps, **kwargs)
        self.save_hyperparameters()

    def loss_terms(self, batch):
        ref = self.reference_logps(batch)
        return lambda out: losses.ipo_loss(out.chosen_logps, out.rejected_logps, *ref, tau=self.hparams.tau) / out.chosen_logps.numel()

    def objective(self, batch, out, stage):
        return self.loss_terms(batch)(out).sum(), self.margin_metrics(out, self.reference_logps(batch), 1.0)


class Distill(ReferenceModule):
    """Reward-model distillation from one Oracle (paper Eq. 4; Fisch et al. 2024).

    Args:
        beta: Scale of the policy's implicit reward (paper: 0.1).
    """

    needs_oracle_scores = True

    score_dims = 1  # one Oracle score per response
    score_shape_error = "Distill takes one Oracle score per response; use EDPO for an ensemble (list) column"

    def __init__(self, model: str, beta: float = 0.1, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()

    def distillation(self, out: PairOutputs, ref: tuple[Tensor, Tensor], oracle: tuple[Tensor, Tensor]) -> Tensor:
        """The loss: paper Eq. 4's mean over the batch's pairs."""
        return self._distillation_terms(out, ref, oracle).sum()

    def _distillation_terms(self, out: PairOutputs, ref: tuple[Tensor, Tensor], oracle: tuple[Tensor, Tensor]) -> Tensor:
        return losses.distill_loss(out.chosen_logps, out.rejected_logps, *ref, *oracle, beta=self.hparams.beta) / out.chosen_logps.numel()

    def _oracle(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        oracle = _oracle_scores(batch, type(self).__name__)
        if oracle[0].dim() != self.score_dims:
            raise ValueError(self.score_shape_error)
        return oracle

    def loss_terms(self, batch):
        oracle, ref = self._oracle(batch), self.reference_logps(batch)
        return lambda out: self._distillation_terms(out, ref, oracle)

    def objective(self, batch, out, stage):
        ref = self.reference_logps(batch)
        return self.distillation(out, ref, self._oracle(batch)), self.margin_metrics(out, ref, self.hparams.beta)


class EDPO(Distill):
    """e-DPO: pessimistic distillation from an ensemble of reward models (Fisch et al. 2024).

    The Oracle score columns hold one list per response, one entry per ensemble member
    (``python -m drdo_lightning score --models '[m1, m2, m3]'`` writes them).

    Args:
        beta: Scale of the policy's implicit reward (paper: 0.1).
    """

    score_dims = 2  # [B, K]: K ensemble members
    score_shape_error = "EDPO needs ensemble scores: score columns holding one list of K numbers per response"

    def distillation(self, out, ref, oracle):
        return losses.edpo_loss(out.chosen_logps, out.rejected_logps, *ref, *oracle, beta=self.hparams.beta)

    def loss_terms(self, batch):
        return None  # the worst ensemble member's batch mean: which member depends on every pair


# ---------------------------------------------------------------------------------------
# Reference-free baselines: one model in memory, like DRDO


def length_normalised_metrics(out: PairOutputs, beta: float) -> dict[str, Tensor]:
    """Implicit rewards ``beta * z̄`` of the reference-free objectives, their accuracy and margin."""
    chosen, rejected = beta * out.chosen_logps.detach(), beta * out.rejected_logps.detach()
    return {"reward_accuracy": (chosen > rejected).float().mean(), "reward_margin": (chosen - rejected).mean()}


class SimPO(PreferenceModule):
    """SimPO (Meng, Xia & Chen 2024): ``-log sigmoid(beta (z̄_w - z̄_l) - gamma)`` on mean token
    log-probs, no reference (:func:`losses.simpo_loss`).

    Args:
        beta: Scale of the length-normalised reward (paper: 2 to 2.5).
        gamma: Target reward margin (paper: ``gamma / beta`` about 0.5).
        average_logps: Mean token log-probs (SimPO's length normalisation; TRL's CPO with
            ``loss_type="simpo"`` averages too); ``false`` sums them.
    """

    def __init__(self, model: str, beta: float = 2.0, gamma: float = 1.0, average_logps: bool = True, **kwargs) -> None:
        super().__init__(model, average_logps=average_logps, **kwargs)
        self.save_hyperparameters()

    def loss_terms(self, batch):
        return lambda out: losses.simpo_loss(
            out.chosen_logps, out.rejected_logps, beta=self.hparams.beta, gamma=self.hparams.gamma
        ) / out.chosen_logps.numel()

    def objective(self, batch, out, stage):
        return self.loss_terms(batch)(out).sum(), length_normalised_metrics(out, self.hparams.beta)


class ORPO(PreferenceModule):
    """ORPO (Hong, Lee & Thorne 2024, Eq. 6): ``NLL(y_w) + odds_ratio_weight * L_OR``, no reference
    and no separate SFT stage (:func:`losses.odds_ratio_loss`); start it from a base model.

    Args:
        odds_ratio_weight: ``lambda``, the odds-ratio term's weight (paper: 0.1; TRL's ``beta``).
        nll_reduction: ``sequence`` (mean over pairs of each response's mean token NLL) or ``token``
            (mean over all chosen tokens of the batch, TRL's; :func:`losses.chosen_nll`).
        nll_on_prompt: Count the prompt's tokens in the NLL too, as TRL's ``ORPOTrainer`` does
            (``false``: the response only, as the ORPO paper's SFT term).
        average_logps: Mean token log-probs inside the odds (ORPO's definition); ``false`` sums them.
    """

    def __init__(
        self,
        model: str,
        odds_ratio_weight: float = 0.1,
        nll_reduction: Literal["sequence", "token"] = "sequence",
        nll_on_prompt: bool = False,
        average_logps: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(model, average_logps=average_logps, **kwargs)
        self.save_hyperparameters()

    @property
    def uses_prompt_logps(self) -> bool:
        return self.hparams.nll_on_prompt

    def loss_terms(self, batch):
        return lambda out: self.chosen_nll(out, self.hparams.nll_reduction) + self.hparams.odds_ratio_weight * (
            losses.odds_ratio_loss(out.chosen_logps, out.rejected_logps) / out.chosen_logps.numel()
        )

    def objective(self, batch, out, stage):
        nll = self.chosen_nll(out, self.hparams.nll_reduction).sum()
        odds_ratio = losses.odds_ratio_loss(out.chosen_logps, out.rejected_logps).mean()
        metrics = {"nll": nll.detach(), "odds_ratio_loss": odds_ratio.detach(),
                   **length_normalised_metrics(out, self.hparams.odds_ratio_weight)}
        return self.loss_terms(batch)(out).sum(), metrics
