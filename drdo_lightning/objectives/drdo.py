"""The DRDO student (paper Eq. 6): distil the Oracle's reward margins and learn the preference with a
focal log-unlikelihood, no reference model.

This is the shape every objective has, and the one to copy for a new one: say what the loss reads
(``needs``), give the loss once per pair with what to log beside it (``pair_loss``).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import Tensor
from torchmetrics import PearsonCorrCoef

from drdo_lightning import losses
from drdo_lightning.objectives.base import PreferenceModule, oracle_scores
from drdo_lightning.objectives.oracle_target import OracleTarget
from drdo_lightning.objectives.outputs import Needs, PairLoss, PairOutputs

STUDENT_REWARDS = ("reward_head", "logps")


def gradient_norm(term: Tensor, params: list[Tensor]) -> Tensor:
    """Norm of ``term``'s gradient over ``params``, detached; the graph is kept for the step's own backward."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads if g is not None]))


class DRDO(PreferenceModule):
    """The DRDO student (paper Eq. 6; :func:`losses.drdo_terms`).

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
            ``distill_weight`` then cancel out (each term is linear in its weight). The weights come
            from the whole batch, so the loss is then not a mean over pairs (never fused).
        balance_momentum: Momentum of the running means of the gradient norms.
        distill_form: The distillation term (:func:`losses.reward_distillation`): ``mse``, the
            paper's squared regression of the reward margins; ``bt_soft``, the cross-entropy between
            the Oracle's Bradley-Terry probability ``sigmoid(Δr*)`` and the student's ``sigmoid(Δr̂)``.
        target_scale: Factor on the Oracle margins ``Δr*`` the student regresses onto
            (:mod:`drdo_lightning.objectives.oracle_target`); 1 keeps them as scored. With the squared
            distillation term this scale, not only ``alpha``, sets how hard distillation pulls.
        target_normalization: ``std`` divides ``Δr*`` by its standard deviation over the training
            pairs (measured once, logged, kept in checkpoints and written beside exports); ``none`` does not.
        student_reward: How the student's reward ``r̂`` is read. ``reward_head`` (the paper's reading:
            a linear head on the last hidden state, beside the LM head; distillation reaches the policy
            only through the shared backbone); ``logps``, ``r̂ = logps_reward_scale * z``, the policy's
            own response log-probability (an interpretation the paper does not make: distillation then
            moves the policy's probabilities directly, a reference-free reward distillation; no head).
        logps_reward_scale: The factor on ``z`` in ``r̂`` with ``student_reward: logps``.
    """

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
        target_scale: float = 1.0,
        target_normalization: Literal["none", "std"] = "none",
        student_reward: Literal["reward_head", "logps"] = "reward_head",
        logps_reward_scale: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        if student_reward not in STUDENT_REWARDS:
            raise ValueError(f"student_reward must be one of {STUDENT_REWARDS}, not {student_reward!r}")
        self.oracle_target = OracleTarget(target_scale, target_normalization)
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
    def needs(self) -> Needs:
        return Needs(reward_head=self.hparams.student_reward == "reward_head", oracle_scores=1,
                     token_unlikelihood=self.hparams.preference_form == "token_unlikelihood")

    @property
    def sums_over_pairs(self) -> bool:
        return not self.hparams.balance_terms

    def student_rewards(self, out: PairOutputs) -> tuple[Tensor, Tensor]:
        """``(r̂_w, r̂_l)``: the reward head's, or ``logps_reward_scale * z`` (``student_reward``)."""
        if self.hparams.student_reward == "logps":
            return self.hparams.logps_reward_scale * out.chosen_logps, self.hparams.logps_reward_scale * out.rejected_logps
        return out.chosen_rewards, out.rejected_rewards

    def training_target(self):
        return {**super().training_target(), "student_reward": self.hparams.student_reward,
                "logps_reward_scale": self.hparams.logps_reward_scale}

    def pair_loss(self, batch, out):
        terms = self.terms(batch, out)
        chosen, rejected = self.student_rewards(out)
        student_margin = (chosen - rejected).detach()
        logged = {"distillation": terms.distillation, "preference": terms.preference, "p_chosen": terms.p_chosen,
                  "reward_accuracy": (student_margin > 0).float()}
        return PairLoss(terms.loss, logged)

    def terms(self, batch: dict[str, Tensor], out: PairOutputs) -> losses.DRDOTerms:
        hp = self.hparams
        return losses.drdo_terms(
            out.chosen_logps, out.rejected_logps, *self.student_rewards(out), *oracle_scores(batch, "DRDO", 1),
            alpha=hp.alpha, gamma=hp.gamma, detach_focal=hp.detach_focal, distill_weight=hp.distill_weight,
            preference_form=hp.preference_form, rejected_token_unlikelihood=out.rejected_token_unlikelihood,
            distill_form=hp.distill_form,
        )

    def epoch_metrics(self, batch, out, stage):
        corr = getattr(self, f"{stage}_reward_corr")
        oracle_chosen, oracle_rejected = oracle_scores(batch, "DRDO", 1)
        chosen, rejected = self.student_rewards(out)
        corr((chosen - rejected).detach().float(), (oracle_chosen - oracle_rejected).float())  # batch value + epoch state
        return {"reward_corr": corr}

    # -- balance_terms ------------------------------------------------------------------

    def on_fit_start(self) -> None:
        # The norms come from autograd on whole parameters, which sharded strategies do not hold.
        if self.hparams.balance_terms and isinstance(self.trainer.strategy, (DeepSpeedStrategy, FSDPStrategy)):
            raise ValueError("balance_terms needs whole parameters on each process: train on one device or with DDP")
        super().on_fit_start()

    def batch_loss(self, batch, out, stage):
        """With ``balance_terms``, the two terms of :meth:`pair_loss` weighted by the batch's gradient norms."""
        if not self.hparams.balance_terms:
            return super().batch_loss(batch, out, stage)
        result = self.pair_loss(batch, out)
        distillation = self.hparams.distill_weight * result.logged["distillation"].mean()
        preference = result.logged["preference"].mean()
        w_distill, w_preference = self.balance_weights(distillation, preference, stage)
        logged = dict(result.logged)
        if stage == "train":  # validation only reuses the weights training set
            distill_norm, preference_norm = self.term_grad_norms.clone()  # the buffer moves on next step
            logged.update(distill_balance_weight=w_distill, preference_balance_weight=w_preference,
                          distill_grad_norm=distill_norm, preference_grad_norm=preference_norm)
        return w_distill * distillation + w_preference * preference, logged

    def balance_weights(self, distillation: Tensor, preference: Tensor, stage: str) -> tuple[Tensor, Tensor]:
        """``(w_d, w_p)`` from the running gradient norms, updated first at a training step."""
        if stage == "train":
            params = [p for p in self.policy.lm.parameters() if p.requires_grad]
            measured = torch.stack([gradient_norm(term, params) for term in (distillation, preference)])
            if self._trainer is not None:  # every process weights its terms alike, as DDP averages their gradients
                measured = self.trainer.strategy.reduce(measured, reduce_op="mean")
            seen = self.term_grad_norms.gt(0).all()
            momentum = self.hparams.balance_momentum if seen else 0.0
            self.term_grad_norms.mul_(momentum).add_((1 - momentum) * measured)
        if not self.term_grad_norms.gt(0).all():  # nothing measured yet: the terms as they are
            return torch.ones((), device=self.device), torch.ones((), device=self.device)
        return losses.balance_weights(*self.term_grad_norms)
