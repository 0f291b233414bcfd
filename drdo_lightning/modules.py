"""LightningModules: one shared base and a thin subclass per objective.

The base owns everything objectives have in common: building the model (in
``configure_model``, so sharded strategies can create parameters in place), one forward over
chosen and rejected concatenated, response-token log-probs, logging, and AdamW with a cosine
schedule and linear warm-up. A subclass declares what it needs (rejected responses, a reward
head) and maps the forward's outputs to a loss with one function from :mod:`losses`.
"""

from __future__ import annotations

from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor
from torchmetrics import PearsonCorrCoef
from transformers import get_cosine_schedule_with_warmup

from drdo_lightning import losses
from drdo_lightning.models import CausalLMWithRewardHead


class PairOutputs(NamedTuple):
    """Per-sequence quantities of one batch; ``None`` where the objective does not need them."""

    chosen_logps: Tensor  # z_w = log pi(y_w|x) over response tokens (sum, or mean with average_logps)
    rejected_logps: Tensor | None
    chosen_rewards: Tensor | None  # r̂(x, y_w) from the reward head
    rejected_rewards: Tensor | None


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
        trust_remote_code: Allow model code from the model directory/hub to run. Off by default.
    """

    uses_rejected: bool = True
    uses_reward_head: bool = False

    def __init__(
        self,
        model: str,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        average_logps: bool = False,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.policy: CausalLMWithRewardHead | None = None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = CausalLMWithRewardHead.from_pretrained(
            self.hparams.model,
            reward_head=self.uses_reward_head,
            trust_remote_code=self.hparams.trust_remote_code,
        ).train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        if self.hparams.gradient_checkpointing:
            self.policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- forward ------------------------------------------------------------------------

    def forward_pairs(self, batch: dict[str, Tensor]) -> PairOutputs:
        """One forward over ``[chosen; rejected]`` (``[2B, T]``); split the results per side."""
        sides = ("chosen", "rejected") if self.uses_rejected else ("chosen",)
        input_ids = torch.cat([batch[f"{s}_input_ids"] for s in sides])
        attention_mask = torch.cat([batch[f"{s}_attention_mask"] for s in sides])
        labels = torch.cat([batch[f"{s}_labels"] for s in sides])
        out = self.policy(input_ids, attention_mask)
        logps = losses.sequence_logps(out.logits, labels, average=self.hparams.average_logps)
        n = batch["chosen_input_ids"].shape[0]
        rewards = out.rewards
        return PairOutputs(
            chosen_logps=logps[:n],
            rejected_logps=logps[n:] if self.uses_rejected else None,
            chosen_rewards=rewards[:n] if rewards is not None else None,
            rejected_rewards=rewards[n:] if rewards is not None and self.uses_rejected else None,
        )

    def objective(self, batch: dict[str, Tensor], out: PairOutputs, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the scalar loss and extra metrics for this batch. Implemented by subclasses."""
        raise NotImplementedError

    # -- steps --------------------------------------------------------------------------

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        out = self.forward_pairs(batch)
        loss, metrics = self.objective(batch, out, stage)
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

    # -- optimisation -------------------------------------------------------------------

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.learning_rate,
            betas=self.hparams.adam_betas,
        )
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, self.hparams.warmup_steps, max(1, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _oracle_scores(batch: dict[str, Tensor], objective: str) -> tuple[Tensor, Tensor]:
    if "chosen_score" not in batch:
        raise ValueError(
            f"{objective} needs Oracle rewards: set --data.chosen_score_column and --data.rejected_score_column"
        )
    return batch["chosen_score"], batch["rejected_score"]


class SFT(PreferenceModule):
    """Supervised fine-tuning on the chosen responses: ``-mean z_w``.

    With ``average_logps=True`` (the SFT recipe's setting) this is the mean token negative
    log-likelihood of each response, averaged over responses.
    """

    uses_rejected = False

    def objective(self, batch, out, stage):
        return -out.chosen_logps.mean(), {}


class OracleRewardModel(PreferenceModule):
    """The Oracle: a causal LM with a reward head trained with paper Eq. 5.

    Args:
        alpha: Weight ``alpha_O`` of the language-modelling regulariser (paper: 0.01).
    """

    uses_reward_head = True

    def __init__(self, model: str, alpha: float = 0.01, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()

    def objective(self, batch, out, stage):
        loss = losses.oracle_loss(
            out.chosen_rewards, out.rejected_rewards, out.chosen_logps, alpha=self.hparams.alpha
        ).mean()
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
    """

    uses_reward_head = True

    def __init__(
        self, model: str, alpha: float = 0.1, gamma: float = 2.0, detach_focal: bool = False, **kwargs
    ) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        # Epoch-level correlation of student and Oracle reward margins, one state per stage.
        self.train_reward_corr, self.val_reward_corr = PearsonCorrCoef(), PearsonCorrCoef()

    def objective(self, batch, out, stage):
        oracle_chosen, oracle_rejected = _oracle_scores(batch, "DRDO")
        terms = losses.drdo_terms(
            out.chosen_logps,
            out.rejected_logps,
            out.chosen_rewards,
            out.rejected_rewards,
            oracle_chosen,
            oracle_rejected,
            alpha=self.hparams.alpha,
            gamma=self.hparams.gamma,
            detach_focal=self.hparams.detach_focal,
        )
        student_margin = (out.chosen_rewards - out.rejected_rewards).detach()
        corr = getattr(self, f"{stage}_reward_corr")
        corr(student_margin, (oracle_chosen - oracle_rejected).float())  # forward: batch value + epoch state
        return (terms.distillation + terms.preference).mean(), {
            "distillation": terms.distillation.mean(),
            "preference": terms.preference.mean(),
            "p_chosen": terms.p_chosen.mean(),
            "reward_accuracy": (student_margin > 0).float().mean(),
            "reward_corr": corr,
        }

