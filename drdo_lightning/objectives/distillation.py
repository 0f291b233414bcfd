"""Reward-model distillation against a reference: from one Oracle (Fisch et al. 2024, paper Eq. 4)
and pessimistically from an ensemble (e-DPO)."""

from __future__ import annotations

from typing import Literal

from drdo_lightning import losses
from drdo_lightning.objectives.base import oracle_scores
from drdo_lightning.objectives.oracle_target import OracleTarget
from drdo_lightning.objectives.outputs import Needs, PairLoss
from drdo_lightning.objectives.reference import ReferenceModule, implicit_reward_metrics, reference_of


class Distill(ReferenceModule):
    """Reward-model distillation from one Oracle (paper Eq. 4; Fisch et al. 2024):
    ``(Δr* - beta h)^2`` per pair (:func:`losses.distill_loss`).

    Args:
        beta: Scale of the policy's implicit reward (paper: 0.1).
        target_scale: Factor on the Oracle margins ``Δr*`` the student regresses onto
            (:mod:`drdo_lightning.objectives.oracle_target`); 1 keeps them as scored.
        target_normalization: ``std`` divides ``Δr*`` by its standard deviation over the training
            pairs (measured once, logged, kept in checkpoints and written beside exports); ``none`` does not.
    """

    needs = Needs(oracle_scores=1)

    def __init__(self, model: str, beta: float = 0.1, target_scale: float = 1.0,
                 target_normalization: Literal["none", "std"] = "none", **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        self.oracle_target = OracleTarget(target_scale, target_normalization)

    def pair_loss(self, batch, out):
        ref = reference_of(batch)
        oracle = oracle_scores(batch, type(self).__name__, 1)
        loss = losses.distill_loss(out.chosen_logps, out.rejected_logps, *ref, *oracle, beta=self.hparams.beta)
        return PairLoss(loss, implicit_reward_metrics(out, ref, self.hparams.beta))


class EDPO(ReferenceModule):
    """e-DPO: pessimistic distillation from an ensemble of reward models (Fisch et al. 2024),
    ``max_k mean_b (Δr*_k - beta h)^2`` (:func:`losses.edpo_loss`): the worst member over the whole
    batch, so the loss is not a mean over pairs and the LM head is never fused with it.

    The Oracle score columns hold one list per response, one entry per ensemble member
    (``python -m drdo_lightning score --models '[m1, m2, m3]'`` writes them).

    Args:
        beta: Scale of the policy's implicit reward (paper: 0.1).
        target_scale: Factor on the Oracle margins ``Δr*`` the student regresses onto
            (:mod:`drdo_lightning.objectives.oracle_target`); 1 keeps them as scored.
        target_normalization: ``std`` divides ``Δr*`` by its standard deviation over the training
            pairs, per ensemble member (measured once, logged, kept in checkpoints and written beside exports); ``none`` does not.
    """

    needs = Needs(oracle_scores=2)
    sums_over_pairs = False

    def __init__(self, model: str, beta: float = 0.1, target_scale: float = 1.0,
                 target_normalization: Literal["none", "std"] = "none", **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        self.oracle_target = OracleTarget(target_scale, target_normalization)

    def batch_loss(self, batch, out, stage):
        ref = reference_of(batch)
        oracle = oracle_scores(batch, type(self).__name__, 2)
        loss = losses.edpo_loss(out.chosen_logps, out.rejected_logps, *ref, *oracle, beta=self.hparams.beta)
        return loss, implicit_reward_metrics(out, ref, self.hparams.beta)
