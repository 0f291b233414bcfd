"""The stages before preference learning: supervised fine-tuning, and the Oracle reward model."""

from __future__ import annotations

from drdo_lightning import losses
from drdo_lightning.objectives.base import PreferenceModule
from drdo_lightning.objectives.outputs import Needs, PairLoss


class SFT(PreferenceModule):
    """Supervised fine-tuning on the chosen responses: ``-z_w`` per pair.

    With ``average_logps=True`` (the SFT recipe's setting) this is the mean token negative
    log-likelihood of each response, averaged over responses. Dropout stays as the model's config
    sets it, as in ordinary fine-tuning (``disable_dropout=False``).
    """

    needs = Needs(rejected=False)

    def __init__(self, model: str, disable_dropout: bool = False, **kwargs) -> None:
        super().__init__(model, disable_dropout=disable_dropout, **kwargs)

    def pair_loss(self, batch, out):
        return PairLoss(-out.chosen_logps, {})


class OracleRewardModel(PreferenceModule):
    """The Oracle: a causal LM with a reward head trained with paper Eq. 5 (:func:`losses.oracle_loss`).

    Args:
        alpha: Weight ``alpha_O`` of the language-modelling regulariser (paper: 0.01).
    """

    needs = Needs(reward_head=True)

    def __init__(self, model: str, alpha: float = 0.01, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()

    def pair_loss(self, batch, out):
        loss = losses.oracle_loss(out.chosen_rewards, out.rejected_rewards, out.chosen_logps, alpha=self.hparams.alpha)
        margin = (out.chosen_rewards - out.rejected_rewards).detach()
        return PairLoss(loss, {"reward_accuracy": (margin > 0).float(), "reward_margin": margin})
