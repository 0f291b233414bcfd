import math

import pytest
import torch
import torch.nn.functional as F

from drdo_lightning import logprobs, losses


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- sequence_logps ---------------------------------------------------------------------


def naive_sequence_logps(logits, labels, average=False):
    """Per-token loop: sum (or mean) of log p(label_t+1 | prefix) over unmasked labels."""
    out = []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(logits.shape[1] - 1):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            total += torch.log_softmax(logits[b, t].double(), -1)[target].item()
            count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_per_token_loop_on_a_model(tiny_lm, padded_responses, padding_side, average):
    torch.manual_seed(0)
    ids, mask, labels = padded_responses(padding_side)
    logits = tiny_lm(input_ids=ids, attention_mask=mask).logits
    got = logprobs.sequence_logps(logits, labels, average=average)
    want = naive_sequence_logps(logits, labels, average=average)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_sequence_logps_hand_computed():
    # One sequence, vocabulary 2, uniform logits at t=0 and a confident one at t=1.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    # log p(0 | t=0) = log 1/2 ; log p(1 | t=1) = log 3/4
    expected = math.log(0.5) + math.log(0.75)
    assert logprobs.sequence_logps(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert logprobs.sequence_logps(logits, labels, average=True).item() == pytest.approx(expected / 2, rel=1e-6)


def test_sequence_logps_gradient_matches_log_softmax_reference():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[:, :2] = -100
    logprobs.sequence_logps(logits, labels).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (ref * (labels[:, 1:] != -100)).sum().backward()
    torch.testing.assert_close(ours, logits.grad)


# -- log1mexp ---------------------------------------------------------------------------


def test_log1mexp_matches_direct_formula_where_that_is_accurate():
    x = torch.tensor([-50.0, -5.0, -1.0, -0.5, -0.1, -1e-3], dtype=torch.float64)
    torch.testing.assert_close(logprobs.log1mexp(x), torch.log(1 - torch.exp(x)))


# -- DRDO (Eq. 6) -----------------------------------------------------------------------


def test_drdo_terms_hand_computed():
    zw, zl = -2.0, -3.0
    rw, rl, ow, ol = 0.5, 0.2, 1.0, -1.0
    alpha, gamma = 0.1, 2.0
    distill = (ow - ol - (rw - rl)) ** 2  # (2 - 0.3)^2 = 2.89
    p_w = sigmoid(zw - zl)
    pref = -alpha * (1 - p_w) ** gamma * (zw - math.log(1 - math.exp(zl)))
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = losses.drdo_terms(t(zw), t(zl), t(rw), t(rl), t(ow), t(ol), alpha=alpha, gamma=gamma)
    assert got.loss.item() == pytest.approx(distill + pref, rel=1e-12)
    assert got.distillation.item() == pytest.approx(distill, rel=1e-12) and got.preference.item() == pytest.approx(pref, rel=1e-12)
    assert distill == pytest.approx(2.89)


def test_drdo_terms_are_unreduced_and_add_up_to_the_loss():
    torch.manual_seed(0)
    args = [torch.randn(4) - (3.0 if i < 2 else 0.0) for i in range(6)]
    terms = losses.drdo_terms(*args)
    assert terms.loss.shape == (4,)
    torch.testing.assert_close(terms.loss, terms.distillation + terms.preference)
    weighted = losses.drdo_terms(*args, distill_weight=0.25)
    torch.testing.assert_close(weighted.loss, 0.25 * terms.distillation + terms.preference)


def test_drdo_gamma_zero_reduces_to_plain_log_unlikelihood():
    zw = torch.tensor([-4.0, -10.0], dtype=torch.float64)
    zl = torch.tensor([-6.0, -0.3], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    got = losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros, alpha=0.7, gamma=0.0).loss
    # -alpha * log(pi_w / (1 - pi_l))
    want = -0.7 * (zw - torch.log(1 - torch.exp(zl)))
    torch.testing.assert_close(got, want)


def test_drdo_distillation_is_unweighted_by_alpha():
    zero = torch.zeros(1)
    args = (torch.tensor([-5.0]), torch.tensor([-5.0]), torch.tensor([1.0]), zero, torch.tensor([3.0]), zero)
    a = losses.drdo_terms(*args, alpha=0.1).distillation
    b = losses.drdo_terms(*args, alpha=10.0).distillation
    torch.testing.assert_close(a, b)
    assert a.item() == pytest.approx(4.0)


def test_drdo_gradcheck_float64():
    torch.manual_seed(0)
    inputs = [
        (torch.randn(3, dtype=torch.float64) - 4.0).requires_grad_(),  # chosen logps
        (torch.randn(3, dtype=torch.float64) - 0.4).clamp(max=-0.05).detach().requires_grad_(),  # rejected logps near 0
        torch.randn(3, dtype=torch.float64, requires_grad=True),
        torch.randn(3, dtype=torch.float64, requires_grad=True),
        torch.randn(3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    ]
    assert torch.autograd.gradcheck(lambda *a: losses.drdo_terms(*a, alpha=0.5, gamma=2.0).loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drdo_stable_for_rejected_logps_from_minus_1e4_to_minus_1e8(dtype):
    zl = torch.tensor([-1e4, -1e3, -100.0, -1.0, -0.69, -1e-2, -1e-4, -1e-6, -1e-8], dtype=dtype, requires_grad=True)
    zw = torch.full_like(zl, -3.0).requires_grad_()
    zeros = torch.zeros_like(zl)
    loss = losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros).loss
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert torch.isfinite(zl.grad).all() and torch.isfinite(zw.grad).all()
    # Where the naive formula is accurate, the stable one agrees with it.
    ok = (zl > -30) & (zl < -1e-3)
    p_w = torch.sigmoid(zw - zl)
    naive = -0.1 * (1 - p_w) ** 2 * (zw - torch.log(1 - torch.exp(zl)))
    torch.testing.assert_close(loss[ok], naive[ok], rtol=1e-4, atol=1e-6)


def test_drdo_exactly_zero_rejected_logp_stays_finite():
    zl = torch.zeros(1, requires_grad=True)
    zeros = torch.zeros(1)
    loss = losses.drdo_terms(torch.tensor([-1.0]), zl, zeros, zeros, zeros, zeros).loss
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(zl.grad).all()


def test_drdo_detach_focal_changes_gradient_not_value():
    zw = torch.tensor([-2.0], requires_grad=True)
    zl = torch.tensor([-2.5])
    zeros = torch.zeros(1)
    kept = losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros).preference
    (g_kept,) = torch.autograd.grad(kept.sum(), zw)
    detached = losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros, detach_focal=True).preference
    (g_det,) = torch.autograd.grad(detached.sum(), zw)
    torch.testing.assert_close(kept, detached)
    assert not torch.allclose(g_kept, g_det)


def test_drdo_preference_gradient_has_the_closed_form_of_appendix_a5():
    # The README's explanation of DRDO's dynamics rests on these: with f = (1 - p)^gamma and
    # u = z_w - log(1 - e^{z_l}), dL/dz_w = alpha f (gamma p u - 1) and
    # dL/dz_l = -alpha f (gamma p u + e^{z_l} / (1 - e^{z_l})): the rejected response is pushed
    # down mainly through the focal weight, in proportion to p and to |z_w|.
    g = torch.Generator().manual_seed(0)
    zw = (-30 * torch.rand(64, generator=g, dtype=torch.float64)).requires_grad_()
    zl = (-30 * torch.rand(64, generator=g, dtype=torch.float64) - 1e-3).requires_grad_()
    alpha, gamma = 0.1, 2.0
    zeros = torch.zeros(64, dtype=torch.float64)
    pref = losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros, alpha=alpha, gamma=gamma).preference
    gw, gl = torch.autograd.grad(pref.sum(), (zw, zl))
    with torch.no_grad():
        p = torch.sigmoid(zw - zl)
        f = (1 - p) ** gamma
        u = zw - torch.log(-torch.expm1(zl))
        torch.testing.assert_close(gw, alpha * f * (gamma * p * u - 1))
        torch.testing.assert_close(gl, -alpha * f * (gamma * p * u + torch.exp(zl) / -torch.expm1(zl)))


# The preference forms' gradient on the rejected response, in closed form. With f = (1 - p)^gamma,
# p = sigmoid(z_w - z_l) and u the form's log term, dL/dz_l = -alpha (gamma p f u [focal kept] + f du/dz_l),
# dL/dz_w = -alpha (-gamma p f u [focal kept] + f). u = z_w + s log(1 - pi_l), s the sign below (per
# token in the token form), so du/dz_l = -s e with e = exp(z) / (1 - exp(z)). Gradient descent lowers
# pi(y_l|x) where dL/dz_l > 0.
FORM_SIGN = {"paper": -1.0, "corrected": 1.0, "token_unlikelihood": 1.0}


def odds(z):
    return torch.exp(z) / -torch.expm1(z)


def preference_and_grads(form, zw, rejected_tokens, detach_focal, alpha=0.1, gamma=2.0):
    """The preference term at ``z_l = sum(rejected_tokens)`` (one token per row for the sequence forms)
    and its autograd gradients on ``z_w`` and on every rejected token log-prob."""
    zw = zw.clone().requires_grad_()
    tokens = rejected_tokens.clone().requires_grad_()
    zl = tokens.sum(-1)
    unlikelihood = logprobs.log1mexp(tokens).sum(-1) if form == "token_unlikelihood" else None
    zeros = torch.zeros_like(zw)
    pref = losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros, alpha=alpha, gamma=gamma, detach_focal=detach_focal,
                             preference_form=form, rejected_token_unlikelihood=unlikelihood).preference
    return (pref,) + torch.autograd.grad(pref.sum(), (zw, tokens))


@pytest.mark.parametrize("detach_focal", [True, False], ids=["focal-detached", "focal-differentiated"])
@pytest.mark.parametrize("form", losses.PREFERENCE_FORMS)
def test_preference_forms_gradient_closed_form_and_sign(form, detach_focal):
    alpha, gamma = 0.1, 2.0
    zw = torch.tensor([-2.0, -2.0, -0.3, -8.0, -1.0], dtype=torch.float64)
    if form == "token_unlikelihood":  # three tokens per rejected response, z_l their sum
        tokens = torch.tensor([[-0.1, -0.15, -0.25], [-2.0, -0.05, -1.0], [-0.01, -0.9, -0.2],
                               [-3.0, -0.5, -0.02], [-0.3, -0.3, -0.3]], dtype=torch.float64)
    else:
        tokens = torch.tensor([[-0.5], [-3.0], [-1.2], [-0.01], [-20.0]], dtype=torch.float64)
    pref, gw, gl = preference_and_grads(form, zw, tokens, detach_focal, alpha, gamma)
    zl = tokens.sum(-1)
    p = torch.sigmoid(zw - zl)
    f = (1 - p) ** gamma
    sign = FORM_SIGN[form]
    u = zw + sign * logprobs.log1mexp(tokens).sum(-1)
    focal_slope = torch.zeros_like(u) if detach_focal else gamma * p * f * u
    torch.testing.assert_close(pref, -alpha * f * u)
    torch.testing.assert_close(gw, -alpha * (f - focal_slope))
    torch.testing.assert_close(gl, -alpha * (focal_slope.unsqueeze(-1) - sign * f.unsqueeze(-1) * odds(tokens)))
    if form == "paper":
        # As printed, Eq. 6's unlikelihood part raises pi(y_l|x): with the focal weight held fixed,
        # gradient descent moves z_l up at every point.
        assert (gl < 0).all() if detach_focal else (gl[0] < 0).all()
    else:
        # Corrected, it lowers pi(y_l|x) (every rejected token, in the token form), with or without
        # the focal weight's derivative, which lowers it too.
        assert (gl > 0).all()


def test_paper_form_at_the_point_quoted_in_the_method_notes():
    # z_w = -2, z_l = -0.5: dL/dz_l = -0.103 with the focal weight detached, -0.077 differentiated.
    zw, zl = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([[-0.5]], dtype=torch.float64)
    assert preference_and_grads("paper", zw, zl, True)[2].item() == pytest.approx(-0.1031, abs=1e-4)
    assert preference_and_grads("paper", zw, zl, False)[2].item() == pytest.approx(-0.0770, abs=1e-4)
    assert preference_and_grads("corrected", zw, zl, True)[2].item() == pytest.approx(0.1031, abs=1e-4)


def test_sequence_forms_agree_where_the_unlikelihood_vanishes_and_need_their_inputs():
    # With summed log-probs of real responses log(1 - pi_l) ~ -pi_l ~ 0: the forms differ by ~1e-9.
    zw, zl, zeros = torch.tensor([-40.0]), torch.tensor([-25.0]), torch.zeros(1)
    paper = losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros).preference
    corrected = losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros, preference_form="corrected").preference
    torch.testing.assert_close(paper, corrected)
    with pytest.raises(ValueError, match="rejected_token_unlikelihood"):
        losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros, preference_form="token_unlikelihood")
    with pytest.raises(ValueError, match="unknown preference form"):
        losses.drdo_terms(zw, zl, zeros, zeros, zeros, zeros, preference_form="ratio")


def test_balance_weights_equalise_the_weighted_norms_and_sum_to_two():
    distill, preference = torch.tensor([18.6, 1.0, 0.5]), torch.tensor([1.3, 1.0, 4.0])
    w_distill, w_preference = losses.balance_weights(distill, preference)
    torch.testing.assert_close(w_distill * distill, w_preference * preference)
    torch.testing.assert_close(w_distill + w_preference, torch.full((3,), 2.0))
    torch.testing.assert_close(w_distill * distill, 2 * distill * preference / (distill + preference))


# -- Bradley–Terry (Eq. 2) and Oracle (Eq. 5) ----------------------------------------------


def test_bradley_terry_hand_computed():
    got = losses.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    want = [-math.log(sigmoid(1.0)), -math.log(sigmoid(-2.0))]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_bradley_terry_stable_for_large_margins():
    got = losses.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1000.0]))
    assert got.item() == pytest.approx(1000.0)


def test_oracle_loss_hand_computed():
    rw, rl, zw = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([-12.0])
    got = losses.oracle_loss(rw, rl, zw, alpha=0.01)
    want = 0.99 * -math.log(sigmoid(1.0)) + 0.01 * 12.0
    assert got.item() == pytest.approx(want, rel=1e-6)
    # alpha = 0 is plain Bradley–Terry.
    torch.testing.assert_close(losses.oracle_loss(rw, rl, zw, alpha=0.0), F.softplus(-(rw - rl)))


# -- Reference-based baselines (Eq. 3, Eq. 4, IPO, e-DPO) -----------------------------------


def ref_args(seed=0, n=5):
    torch.manual_seed(seed)
    return [torch.randn(n, dtype=torch.float64) * 3 - 20 for _ in range(4)]


def test_dpo_hand_computed():
    # h = (-10 - -12) - (-15 - -14) = 2 - (-1) = 3
    got = losses.dpo_loss(torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]), torch.tensor([-14.0]), beta=0.1)
    assert got.item() == pytest.approx(-math.log(sigmoid(0.3)), rel=1e-6)


def test_dpo_matches_formula_on_random_inputs():
    zw, zl, rw, rl = ref_args()
    want = -torch.log(torch.sigmoid(0.5 * ((zw - rw) - (zl - rl))))
    torch.testing.assert_close(losses.dpo_loss(zw, zl, rw, rl, beta=0.5), want)


def test_ipo_hand_computed_and_formula():
    got = losses.ipo_loss(torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]), torch.tensor([-14.0]), tau=0.25)
    assert got.item() == pytest.approx((3.0 - 2.0) ** 2)
    zw, zl, rw, rl = ref_args(1)
    torch.testing.assert_close(losses.ipo_loss(zw, zl, rw, rl, tau=0.1), ((zw - rw) - (zl - rl) - 5.0) ** 2)


def test_distill_hand_computed():
    # h = 3, Δr* = 1.0 - (-0.5) = 1.5, beta = 0.1 -> (1.5 - 0.3)^2 = 1.44
    got = losses.distill_loss(
        torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]), torch.tensor([-14.0]),
        torch.tensor([1.0]), torch.tensor([-0.5]), beta=0.1,
    )
    assert got.item() == pytest.approx(1.44)


def test_edpo_is_the_worst_member_of_batch_mean_distillation():
    zw, zl, rw, rl = ref_args(2, n=4)
    oracle_w = torch.randn(4, 3, dtype=torch.float64)
    oracle_l = torch.randn(4, 3, dtype=torch.float64)
    per_member = [
        losses.distill_loss(zw, zl, rw, rl, oracle_w[:, k], oracle_l[:, k], beta=0.2).mean() for k in range(3)
    ]
    got = losses.edpo_loss(zw, zl, rw, rl, oracle_w, oracle_l, beta=0.2)
    assert got.dim() == 0
    assert got.item() == pytest.approx(max(p.item() for p in per_member))
    # With one member it is plain distillation, batch-averaged.
    single = losses.edpo_loss(zw, zl, rw, rl, oracle_w[:, :1], oracle_l[:, :1], beta=0.2)
    assert single.item() == pytest.approx(per_member[0].item())


def test_edpo_hand_computed():
    # Two pairs, two members; h = [1, -1]; beta = 1.
    zw, zl = torch.tensor([0.0, 0.0]), torch.tensor([-1.0, 1.0])
    zero = torch.zeros(2)
    ow = torch.tensor([[1.0, 3.0], [-1.0, 0.0]])
    ol = torch.zeros(2, 2)
    # member 0: ((1-1)^2 + (-1+1)^2)/2 = 0 ; member 1: ((3-1)^2 + (0+1)^2)/2 = 2.5
    assert losses.edpo_loss(zw, zl, zero, zero, ow, ol, beta=1.0).item() == pytest.approx(2.5)


# -- noise-robust DPO, reference-free peers, soft-label distillation ---------------------

PAIR = (torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]), torch.tensor([-14.0]))  # h = 3


def test_cdpo_hand_computed_and_zero_smoothing_is_dpo():
    got = losses.cdpo_loss(*PAIR, beta=0.1, label_smoothing=0.2)
    assert got.item() == pytest.approx(-0.8 * math.log(sigmoid(0.3)) - 0.2 * math.log(sigmoid(-0.3)), rel=1e-6)
    args = ref_args(2)
    assert torch.equal(losses.cdpo_loss(*args, beta=0.5, label_smoothing=0.0), losses.dpo_loss(*args, beta=0.5))


def test_cdpo_is_minimal_at_the_finite_margin_its_labels_allow():
    h = torch.linspace(-60, 60, 120001, dtype=torch.float64)
    zero = torch.zeros_like(h)
    loss = losses.cdpo_loss(h, zero, zero, zero, beta=0.1, label_smoothing=0.1)
    assert 0.1 * h[loss.argmin()].item() == pytest.approx(math.log(0.9 / 0.1), abs=1e-3)


def test_rdpo_hand_computed_zero_flip_is_dpo_and_unbiased_under_flips():
    got = losses.rdpo_loss(*PAIR, beta=0.1, flip_rate=0.2)
    assert got.item() == pytest.approx((-0.8 * math.log(sigmoid(0.3)) + 0.2 * math.log(sigmoid(-0.3))) / 0.6, rel=1e-6)
    zw, zl, rw, rl = ref_args(3)
    assert torch.equal(losses.rdpo_loss(zw, zl, rw, rl, beta=0.5, flip_rate=0.0), losses.dpo_loss(zw, zl, rw, rl, beta=0.5))
    # A label kept with probability 1 - eps and swapped with probability eps: in expectation the clean DPO loss.
    eps = 0.3
    expected = (1 - eps) * losses.rdpo_loss(zw, zl, rw, rl, beta=0.5, flip_rate=eps) + eps * losses.rdpo_loss(
        zl, zw, rl, rw, beta=0.5, flip_rate=eps)
    torch.testing.assert_close(expected, losses.dpo_loss(zw, zl, rw, rl, beta=0.5))
    with pytest.raises(ValueError, match="0.5"):
        losses.rdpo_loss(zw, zl, rw, rl, flip_rate=0.5)


def test_simpo_hand_computed_and_its_limit_on_length_one_responses():
    got = losses.simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=1.0)
    assert got.item() == pytest.approx(-math.log(sigmoid(2.0 * 1.0 - 1.0)), rel=1e-6)
    # gamma 0, beta 1, one token per response: the mean log-prob is the log-prob, and SimPO is the
    # sigmoid loss of the log-prob margin.
    logits = torch.randn(4, 3, 7, dtype=torch.float64)
    labels = torch.full((4, 3), -100)
    labels[:, 2] = torch.randint(0, 7, (4,))
    z = logprobs.sequence_logps(logits, labels, average=True)
    torch.testing.assert_close(losses.simpo_loss(z[:2], z[2:], beta=1.0, gamma=0.0), -F.logsigmoid(z[:2] - z[2:]))


def test_odds_ratio_hand_computed():
    p_w, p_l = 0.6, 0.2
    got = losses.odds_ratio_loss(torch.tensor([math.log(p_w)]), torch.tensor([math.log(p_l)]))
    log_odds_ratio = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    assert got.item() == pytest.approx(-math.log(sigmoid(log_odds_ratio)), rel=1e-6)


def test_chosen_nll_terms_reductions_hand_computed():
    total, counts = torch.tensor([-4.0, -9.0]), torch.tensor([2.0, 3.0])
    sequence, token = (losses.chosen_nll_terms(total, counts, reduction) for reduction in ("sequence", "token"))
    torch.testing.assert_close(sequence, torch.tensor([2.0 / 2, 3.0 / 2]))  # each response's mean token NLL / B
    torch.testing.assert_close(token, torch.tensor([4.0 / 5, 9.0 / 5]))  # each response's NLL / all chosen tokens
    assert sequence.sum().item() == pytest.approx((2.0 + 3.0) / 2)
    assert token.sum().item() == pytest.approx(13.0 / 5.0)
    with pytest.raises(ValueError, match="sequence"):
        losses.chosen_nll_terms(total, counts, "mean")


def test_soft_label_distillation_hand_computed_saturated_and_its_gradient():
    q, m = sigmoid(0.5), 1.5
    got = losses.reward_distillation(torch.tensor([0.5]), torch.tensor([m]), "bt_soft")
    assert got.item() == pytest.approx(-(q * math.log(sigmoid(m)) + (1 - q) * math.log(sigmoid(-m))), rel=1e-6)
    student = torch.randn(6, dtype=torch.float64, requires_grad=True)
    saturated = losses.reward_distillation(torch.full((6,), 60.0, dtype=torch.float64), student, "bt_soft")
    torch.testing.assert_close(saturated, losses.bradley_terry_loss(student, torch.zeros_like(student)))
    oracle = torch.randn(6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(losses.reward_distillation(oracle, student, "bt_soft").sum(), student)
    torch.testing.assert_close(grad, torch.sigmoid(student) - torch.sigmoid(oracle))
    assert torch.equal(losses.reward_distillation(oracle, student, "mse"), (oracle - student).square())


def test_drdo_terms_take_the_distillation_form():
    args = [torch.tensor([-5.0]), torch.tensor([-6.0]), torch.tensor([0.2]), torch.tensor([-0.1]),
            torch.tensor([1.0]), torch.tensor([-1.0])]
    soft = losses.drdo_terms(*args, distill_form="bt_soft")
    torch.testing.assert_close(soft.distillation, losses.reward_distillation(torch.tensor([2.0]), torch.tensor([0.3]), "bt_soft"))
    assert soft.preference == losses.drdo_terms(*args).preference
    with pytest.raises(ValueError, match="bt_soft"):
        losses.drdo_terms(*args, distill_form="kl")


@pytest.mark.parametrize("name", ["cdpo", "rdpo", "simpo", "odds_ratio", "bt_soft"])
def test_new_losses_gradcheck_float64(name):
    torch.manual_seed(0)
    logps = [(-torch.rand(4, dtype=torch.float64) * 3 - 0.1).requires_grad_() for _ in range(4)]
    fn = {
        "cdpo": lambda zw, zl, rw, rl: losses.cdpo_loss(zw, zl, rw, rl, beta=0.7, label_smoothing=0.2),
        "rdpo": lambda zw, zl, rw, rl: losses.rdpo_loss(zw, zl, rw, rl, beta=0.7, flip_rate=0.2),
        "simpo": lambda zw, zl, rw, rl: losses.simpo_loss(zw, zl, beta=2.0, gamma=0.5) + 0 * (rw + rl),
        "odds_ratio": lambda zw, zl, rw, rl: losses.odds_ratio_loss(zw, zl) + 0 * (rw + rl),
        "bt_soft": lambda zw, zl, rw, rl: losses.reward_distillation(zw - zl, rw - rl, "bt_soft"),
    }[name]
    assert torch.autograd.gradcheck(fn, logps)
