"""Preference-learning objectives as pure tensor functions.

Every function takes per-sequence quantities (log-probabilities ``z = log pi(y|x)`` summed
over response tokens, or scalar rewards) and returns an unreduced per-pair loss ``[B]``, so
the caller chooses the reduction. Equation numbers follow Nath et al., "Simultaneous Reward
Distillation and Preference Learning" (arXiv 2410.08458); ``docs/method.md`` derives them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from drdo_lightning.logprobs import log1mexp

PREFERENCE_FORMS = ("paper", "corrected", "token_unlikelihood")


def preference_log_term(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    form: str = "paper",
    rejected_token_unlikelihood: Tensor | None = None,
) -> Tensor:
    """The log-likelihood inside DRDO's preference term, ``u`` in ``-alpha * (1 - p_w)^gamma * u``.

    - ``"paper"``, paper Eq. 6 as printed: ``u = log(pi(y_w|x) / (1 - pi(y_l|x))) = z_w - log(1 - exp(z_l))``.
      With the focal weight held fixed, ``dL/dz_l = -alpha f exp(z_l) / (1 - exp(z_l)) < 0``: this part
      *raises* ``pi(y_l|x)``, the opposite of what the paper's gradient analysis says it does.
    - ``"corrected"``, the unlikelihood term with the sign of Welleck et al. (2020), which maximise
      ``log(1 - pi)`` of what is to be unlearnt: ``u = z_w + log(1 - exp(z_l))``, so
      ``dL/dz_l = +alpha f exp(z_l) / (1 - exp(z_l)) > 0``: minimising lowers ``pi(y_l|x)``.
    - ``"token_unlikelihood"``, the same at token level: ``u = z_w + sum_t log(1 - p(y_l,t))``, with
      ``rejected_token_unlikelihood`` the sum (or mean, with length-normalised log-probs) over the
      rejected response's tokens. A sequence probability is tiny for any real response, so
      ``log(1 - pi(y_l|x))`` is ~0 in both sequence forms; a token's probability is not, so this
      form pushes every likely token of ``y_l`` down.
    """
    if form == "paper":
        return chosen_logps - log1mexp(rejected_logps)
    if form == "corrected":
        return chosen_logps + log1mexp(rejected_logps)
    if form == "token_unlikelihood":
        if rejected_token_unlikelihood is None:
            raise ValueError("the token_unlikelihood form needs rejected_token_unlikelihood, sum_t log(1 - p(y_l,t))")
        return chosen_logps + rejected_token_unlikelihood
    raise ValueError(f"unknown preference form {form!r}; one of {PREFERENCE_FORMS}")


DISTILL_FORMS = ("mse", "bt_soft")


def reward_distillation(oracle_margin: Tensor, student_margin: Tensor, form: str = "mse") -> Tensor:
    """DRDO's distillation term per pair, from the Oracle's margin ``Δr* = r*_w - r*_l`` and the student's ``Δr̂``.

    - ``"mse"``, paper Eq. 6's first term: ``(Δr* - Δr̂)^2``, a regression of the margins.
    - ``"bt_soft"``: the Bradley-Terry cross-entropy with the Oracle's preference probability
      ``q = sigmoid(Δr*)`` as a soft label, ``-[q log sigmoid(Δr̂) + (1 - q) log sigmoid(-Δr̂)]``
      (reward distillation as in Fisch et al. 2024, read as matching preference distributions). Its
      gradient in ``Δr̂`` is ``sigmoid(Δr̂) - q``: bounded, so an Oracle margin that is large but
      uncertain pulls no harder than a confident one; with a saturated Oracle (``q -> 1``) it is
      :func:`bradley_terry_loss` of the student's rewards. The minimum is the entropy of ``q``, not 0.
    """
    if form == "mse":
        return (oracle_margin - student_margin).square()
    if form == "bt_soft":
        q = torch.sigmoid(oracle_margin)
        return -(q * F.logsigmoid(student_margin) + (1.0 - q) * F.logsigmoid(-student_margin))
    raise ValueError(f"unknown distillation form {form!r}; one of {DISTILL_FORMS}")


class DRDOTerms(NamedTuple):
    """The two parts of paper Eq. 6, per pair, the preference probability ``p_w``, and the loss
    ``distill_weight * distillation + preference``."""

    distillation: Tensor
    preference: Tensor
    p_chosen: Tensor
    loss: Tensor


def drdo_terms(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    oracle_chosen_rewards: Tensor,
    oracle_rejected_rewards: Tensor,
    *,
    alpha: float = 0.1,
    gamma: float = 2.0,
    detach_focal: bool = False,
    distill_weight: float = 1.0,
    preference_form: str = "paper",
    rejected_token_unlikelihood: Tensor | None = None,
    distill_form: str = "mse",
) -> DRDOTerms:
    """Both terms of the DRDO loss (paper Eq. 6) and their weighted sum, unreduced.

    distillation = (r*(x,y_w) - r*(x,y_l) - (r̂_w - r̂_l))^2     (distill_form "mse", the paper's)
    preference   = -alpha * (1 - p_w)^gamma * u,  p_w = sigmoid(z_w - z_l)

    ``distill_form="bt_soft"`` replaces the squared regression by a cross-entropy against the
    Oracle's Bradley-Terry probability (:func:`reward_distillation`).

    ``u`` is :func:`preference_log_term` of ``preference_form``; the default, ``"paper"``, is Eq. 6
    as printed, ``u = z_w - log(1 - exp(z_l))``. The focal weight ``(1 - p_w)^gamma`` is
    differentiated through, as in the paper's gradient analysis (Appendix A.5); its derivative
    lowers ``z_l`` wherever ``u < 0``: always in the corrected forms, and in the printed one unless
    ``pi(y_w|x) > 1 - pi(y_l|x)``. ``detach_focal=True`` treats it as a constant weight.
    ``distill_weight`` scales the distillation term (the paper's is 1; 0 for ablations).
    """
    distillation = reward_distillation(
        oracle_chosen_rewards - oracle_rejected_rewards, chosen_rewards - rejected_rewards, distill_form
    )

    p_chosen = torch.sigmoid(chosen_logps - rejected_logps)
    focal = (1.0 - p_chosen).pow(gamma)
    if detach_focal:
        focal = focal.detach()
    log_term = preference_log_term(chosen_logps, rejected_logps, preference_form, rejected_token_unlikelihood)
    preference = -alpha * focal * log_term
    return DRDOTerms(distillation, preference, p_chosen, distill_weight * distillation + preference)


def balance_weights(distill_grad_norm: Tensor, preference_grad_norm: Tensor) -> tuple[Tensor, Tensor]:
    """Weights ``(w_d, w_p)`` that give two loss terms gradients of equal norm.

    With ``g_d``, ``g_p`` (running estimates of) the norms of the terms' gradients on the shared
    parameters, ``w_d = 2 g_p / (g_d + g_p)`` and ``w_p = 2 g_d / (g_d + g_p)``: each weight is
    inversely proportional to its term's gradient norm, so ``w_d g_d = w_p g_p``, and they sum to 2,
    the number of terms, as in GradNorm (Chen et al. 2018), so the step size keeps its meaning
    (both weighted terms get the harmonic mean of the two norms). Returns detached weights.
    """
    total = (distill_grad_norm + preference_grad_norm).clamp(min=torch.finfo(torch.float32).tiny)
    return (2 * preference_grad_norm / total).detach(), (2 * distill_grad_norm / total).detach()


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Reward-model negative log-likelihood, ``-log sigmoid(r(x,y_w) - r(x,y_l))`` (paper Eq. 2)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def oracle_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, *, alpha: float = 0.01
) -> Tensor:
    """Oracle reward-model loss (paper Eq. 5), per pair.

    ``-(1 - alpha) * log sigmoid(r_w - r_l) - alpha * log pi(y_w|x)``: Bradley–Terry plus a
    language-modelling regulariser on the chosen response (Yang et al. 2024).
    """
    return (1.0 - alpha) * bradley_terry_loss(chosen_rewards, rejected_rewards) - alpha * chosen_logps


# ---------------------------------------------------------------------------------------
# Baselines measured against a frozen reference policy


def policy_margin(
    chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
) -> Tensor:
    """``h = (z_w - z_w^ref) - (z_l - z_l^ref)``: the log-ratio margin every reference-based loss uses."""
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """DPO (paper Eq. 3; Rafailov et al. 2023): ``-log sigmoid(beta * h)`` per pair."""
    return -F.logsigmoid(beta * policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))


def check_noise_rate(eps: float, name: str) -> None:
    """A label-noise rate must lie in ``[0, 1/2)``: at 1/2 the labels carry no preference at all."""
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"{name} must lie in [0, 0.5), not {eps}")


def cdpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> Tensor:
    """Conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"), per pair.

    ``(1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h)``: DPO against labels that are
    right with probability ``1 - eps``. The loss is minimal at a finite margin ``beta h = log((1 - eps) / eps)``,
    so no pair is pushed apart without bound. ``eps = 0`` is :func:`dpo_loss`. TRL 1.16's sigmoid
    DPO loss no longer reads ``label_smoothing``; OpenRLHF's and torchtune's DPO losses do.
    """
    logits = beta * policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def rdpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    flip_rate: float = 0.1,
) -> Tensor:
    """Robust DPO (rDPO; Chowdhury, Kini & Natarajan, ICML 2024, Eq. 8), per pair.

    ``[(1 - eps) * l(h) - eps * l(-h)] / (1 - 2 eps)`` with ``l(h) = -log sigmoid(beta h)`` and
    ``eps < 1/2`` the rate at which labels are flipped: an unbiased estimate of the DPO loss on the
    clean labels (its expectation over the flip equals ``l`` of the true order). Unlike cDPO it is
    not bounded below. ``eps = 0`` is :func:`dpo_loss`; TRL 1.16 ``loss_type="robust"`` with
    ``label_smoothing=eps``.
    """
    check_noise_rate(flip_rate, "rDPO's flip_rate")
    logits = beta * policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (-(1.0 - flip_rate) * F.logsigmoid(logits) + flip_rate * F.logsigmoid(-logits)) / (1.0 - 2.0 * flip_rate)


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    tau: float = 0.1,
) -> Tensor:
    """IPO (Azar et al. 2023): ``(h - 1 / (2 tau))^2`` per pair."""
    margin = policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (margin - 1.0 / (2.0 * tau)).square()


def distill_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    oracle_chosen_rewards: Tensor,
    oracle_rejected_rewards: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Reward-model distillation (paper Eq. 4; Fisch et al. 2024), per pair.

    ``(r*(x,y_w) - r*(x,y_l) - beta * h)^2``: the policy's implicit reward margin regresses
    onto the Oracle's. With ``[B, K]`` Oracle rewards it returns ``[B, K]``, one column per
    ensemble member (``h`` broadcasts).
    """
    margin = policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if oracle_chosen_rewards.dim() == 2:
        margin = margin.unsqueeze(-1)
    return (oracle_chosen_rewards - oracle_rejected_rewards - beta * margin).square()


def edpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    oracle_chosen_rewards: Tensor,
    oracle_rejected_rewards: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """e-DPO, pessimistic ensemble distillation (Fisch et al. 2024), a **scalar**.

    Oracle rewards are ``[B, K]``, one column per reward model. Our reading of the paper:
    minimise the worst case over the ensemble of the batch-mean distillation loss,
    ``max_k mean_b (Δr*_k - beta * h)^2``. The max is taken over batch means (not per pair)
    so that one reward model answers for the whole batch, as a worst-case reward model
    would.
    """
    per_member = distill_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        oracle_chosen_rewards,
        oracle_rejected_rewards,
        beta=beta,
    ).mean(0)
    return per_member.max()


# ---------------------------------------------------------------------------------------
# Reference-free baselines


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 2.0, gamma: float = 1.0) -> Tensor:
    """SimPO (Meng, Xia & Chen 2024, Eq. 6), per pair: ``-log sigmoid(beta (z̄_w - z̄_l) - gamma)``.

    ``z̄`` is the *mean* token log-prob of a response (the length-normalised reward
    ``(beta / |y|) log pi(y|x)``), ``gamma`` a target reward margin; no reference model. Paper:
    beta 2 to 2.5, ``gamma / beta`` about 0.5. TRL: ``CPOTrainer`` with ``loss_type="simpo"``,
    ``simpo_gamma = gamma`` and ``cpo_alpha = 0``.
    """
    return -F.logsigmoid(beta * (chosen_logps - rejected_logps) - gamma)


NLL_REDUCTIONS = ("sequence", "token")


def chosen_nll_terms(logps_sum: Tensor, token_counts: Tensor, reduction: str = "sequence") -> Tensor:
    """Each pair's share ``[B]`` of the chosen responses' negative log-likelihood, from their summed
    log-probs ``[B]`` and token counts ``[B]``; their sum is the batch's NLL, and pair ``b``'s share
    depends on its own log-probs only.

    - ``"sequence"``: ``-z_b / n_b / B``, summing to ``mean_b (-z_b / n_b)``: each response's mean
      token NLL, then the batch mean (every pair weighs the same, whatever its length; the same on
      any split of the batch).
    - ``"token"``: ``-z_b / sum_b n_b``, summing to ``-sum_b z_b / sum_b n_b``: the mean over every
      chosen token of the batch (TRL's DPO ``"sft"`` term, its ORPO and CPO NLL): long responses
      weigh more, and a batch split across processes averages per-process means, which differs from
      one process's value.
    """
    if reduction == "sequence":
        return -(logps_sum / token_counts) / logps_sum.numel()
    if reduction == "token":
        return -logps_sum / token_counts.sum()
    raise ValueError(f"unknown NLL reduction {reduction!r}; one of {NLL_REDUCTIONS}")


def log_odds(logps: Tensor) -> Tensor:
    """``log(P / (1 - P))`` of a probability given as its log, ``logps = log P < 0``."""
    return logps - log1mexp(logps)


def odds_ratio_loss(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
    """ORPO's odds-ratio term (Hong, Lee & Thorne 2024, Eq. 7), per pair: ``-log sigmoid(log odds_w - log odds_l)``.

    ``odds(y) = P(y|x) / (1 - P(y|x))`` with ``P`` the length-averaged probability
    ``exp(z̄)``, ``z̄`` the mean token log-prob. ORPO's loss is an NLL on the chosen response plus
    ``lambda`` times this (:class:`drdo_lightning.ORPO`); TRL's ``ORPOTrainer`` calls ``lambda`` beta.
    """
    return -F.logsigmoid(log_odds(chosen_logps) - log_odds(rejected_logps))
