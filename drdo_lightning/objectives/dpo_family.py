"""DPO and the objectives that change its loss on the same log-ratio margin: cDPO, rDPO, RPO, IPO."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from drdo_lightning import losses
from drdo_lightning.objectives.outputs import Needs, PairLoss, PairOutputs, chosen_nll
from drdo_lightning.objectives.reference import ReferenceModule, implicit_reward_metrics, reference_of


class DPO(ReferenceModule):
    """Direct Preference Optimization (paper Eq. 3): ``-log sigmoid(beta h)`` per pair, ``h`` the
    log-ratio margin against the reference (:func:`losses.dpo_loss`).

    Its variants (cDPO, rDPO) change only :meth:`margin_loss`; RPO adds a term.

    Args:
        beta: Inverse temperature of the implicit reward (paper: 0.1).
    """

    needs = Needs()

    def __init__(self, model: str, beta: float = 0.1, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()

    def margin_loss(self, out: PairOutputs, ref: tuple[Tensor, Tensor]) -> Tensor:
        """The per-pair loss on the log-ratio margin."""
        return losses.dpo_loss(out.chosen_logps, out.rejected_logps, *ref, beta=self.hparams.beta)

    def pair_loss(self, batch, out):
        ref = reference_of(batch)
        return PairLoss(self.margin_loss(out, ref), implicit_reward_metrics(out, ref, self.hparams.beta))


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

    def margin_loss(self, out, ref):
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

    def margin_loss(self, out, ref):
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
            the mean over all chosen tokens of the batch, TRL's (:func:`losses.chosen_nll_terms`).
    """

    def __init__(self, model: str, nll_weight: float = 1.0, nll_reduction: Literal["sequence", "token"] = "sequence",
                 **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()

    def pair_loss(self, batch, out):
        dpo = super().pair_loss(batch, out)
        nll = chosen_nll(out, self.hparams.nll_reduction, self.hparams.average_logps)
        return PairLoss(dpo.loss + self.hparams.nll_weight * nll, {**dpo.logged, "dpo_loss": dpo.loss, "nll": nll})


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

    needs = Needs()

    def __init__(self, model: str, tau: float = 0.1, average_logps: bool = True, **kwargs) -> None:
        super().__init__(model, average_logps=average_logps, **kwargs)
        self.save_hyperparameters()

    def pair_loss(self, batch, out):
        ref = reference_of(batch)
        loss = losses.ipo_loss(out.chosen_logps, out.rejected_logps, *ref, tau=self.hparams.tau)
        return PairLoss(loss, implicit_reward_metrics(out, ref, 1.0))
