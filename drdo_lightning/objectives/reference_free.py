"""Reference-free baselines: one model in memory, like DRDO (SimPO, ORPO)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from drdo_lightning import losses
from drdo_lightning.objectives.base import PreferenceModule
from drdo_lightning.objectives.outputs import Needs, PairLoss, PairOutputs, chosen_nll


def length_normalised_metrics(out: PairOutputs, beta: float) -> dict[str, Tensor]:
    """Per pair: implicit rewards ``beta * z̄`` of the reference-free objectives, whether the chosen one is larger, their margin."""
    chosen, rejected = beta * out.chosen_logps.detach(), beta * out.rejected_logps.detach()
    return {"reward_accuracy": (chosen > rejected).float(), "reward_margin": chosen - rejected}


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

    def pair_loss(self, batch, out):
        loss = losses.simpo_loss(out.chosen_logps, out.rejected_logps, beta=self.hparams.beta, gamma=self.hparams.gamma)
        return PairLoss(loss, length_normalised_metrics(out, self.hparams.beta))


class ORPO(PreferenceModule):
    """ORPO (Hong, Lee & Thorne 2024, Eq. 6): ``NLL(y_w) + odds_ratio_weight * L_OR``, no reference
    and no separate SFT stage (:func:`losses.odds_ratio_loss`); start it from a base model.

    Args:
        odds_ratio_weight: ``lambda``, the odds-ratio term's weight (paper: 0.1; TRL's ``beta``).
        nll_reduction: ``sequence`` (mean over pairs of each response's mean token NLL) or ``token``
            (mean over all chosen tokens of the batch, TRL's; :func:`losses.chosen_nll_terms`).
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
    def needs(self) -> Needs:
        return Needs(prompt_logps=self.hparams.nll_on_prompt)

    def pair_loss(self, batch, out):
        nll = chosen_nll(out, self.hparams.nll_reduction, self.hparams.average_logps)
        odds_ratio = losses.odds_ratio_loss(out.chosen_logps, out.rejected_logps)
        logged = {"nll": nll, "odds_ratio_loss": odds_ratio, **length_normalised_metrics(out, self.hparams.odds_ratio_weight)}
        return PairLoss(nll + self.hparams.odds_ratio_weight * odds_ratio, logged)
