"""KL(π || π_SFT) on the policy's own samples: log-probs against explicit softmax products of a
2-layer tiny Llama, the estimate as the mean log-ratio, and the sampled ids it scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from drdo_lightning import CausalLMWithRewardHead
from drdo_lightning.evaluation.divergence import kl_estimate, log_ratios, response_logps
from drdo_lightning.evaluation.generation import generate, generate_ids, load_policy

# Three (prompt, response) samples of different lengths: batched, they are padded.
PROMPTS = [[1, 17, 42], [1, 5, 9, 33, 71], [1, 8]]
RESPONSES = [[60, 61, 62, 2], [44, 3], [12, 13, 14, 15, 16, 2]]


def explicit_logp(lm, prompt: list[int], response: list[int]) -> float:
    """log of ∏_t softmax(logits of the prefix up to token t)[y_t]: one unpadded forward per token, in float64."""
    probability = 1.0
    for t, token in enumerate(response):
        ids = torch.tensor([prompt + response[:t]])
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0, -1].double()
        probability *= (logits.exp() / logits.exp().sum())[token].item()
    return math.log(probability)


@pytest.fixture(scope="module")
def other_lm(tiny_lm) -> LlamaForCausalLM:
    """The tiny Llama with every weight scaled by 1.5: a policy that moved away from it."""
    other = LlamaForCausalLM(tiny_lm.config).eval()
    other.load_state_dict(tiny_lm.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    return other


def test_response_logps_are_the_explicit_softmax_products_at_temperature_1(tiny_lm):
    assert tiny_lm.config.num_hidden_layers == 2
    want = [explicit_logp(tiny_lm, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    got = response_logps(tiny_lm, PROMPTS, RESPONSES, pad_token_id=0, batch_size=2)  # a padded batch, and a single row
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A CausalLMWithRewardHead is read the same way (its head plays no part).
    wrapped = CausalLMWithRewardHead(tiny_lm, CausalLMWithRewardHead.new_reward_head(tiny_lm.config.hidden_size))
    np.testing.assert_allclose(response_logps(wrapped, PROMPTS, RESPONSES), want, rtol=1e-5)


def test_the_kl_estimate_is_the_mean_log_ratio_on_the_samples(tiny_lm, other_lm):
    ratios = [explicit_logp(other_lm, p, r) - explicit_logp(tiny_lm, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    np.testing.assert_allclose(log_ratios(other_lm, tiny_lm, PROMPTS, RESPONSES), ratios, rtol=1e-5, atol=1e-5)
    estimate = kl_estimate(other_lm, tiny_lm, PROMPTS, RESPONSES, samples=200)
    assert estimate.value == pytest.approx(np.mean(ratios), abs=1e-5)
    assert estimate.low <= estimate.value <= estimate.high
    # To itself: exactly 0, with a collapsed interval.
    assert tuple(kl_estimate(tiny_lm, tiny_lm, PROMPTS, RESPONSES)) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="3 prompts and 2 responses"):
        response_logps(tiny_lm, PROMPTS, RESPONSES[:2])


def test_at_temperature_1_without_top_p_the_estimate_is_unbiased_for_the_exact_kl(tiny_lm, other_lm):
    """One-token responses: the exact KL is a sum over the vocabulary; the mean log-ratio of many
    samples from the policy (at T = 1, top-p 1) comes within its standard error of it."""
    prompt = [1, 17, 42]
    with torch.no_grad():
        p = torch.log_softmax(other_lm(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
        q = torch.log_softmax(tiny_lm(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
    exact = float((p.exp() * (p - q)).sum())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p.exp(), 4000, replacement=True, generator=generator).tolist()
    ratios = log_ratios(other_lm, tiny_lm, [prompt] * len(tokens), [[t] for t in tokens], batch_size=1000)
    assert exact > 0
    assert abs(ratios.mean() - exact) < 4 * ratios.std() / math.sqrt(len(ratios))


def test_generate_ids_returns_the_sampled_ids_the_text_came_from(tiny_model_dir, tiny_task):
    model, tok = load_policy(str(tiny_model_dir))
    prompts = [r["prompt"] for r in tiny_task["eval"][:4]]
    out = generate_ids(model, tok, prompts, temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=3, seed=0)
    assert out.texts == generate(model, tok, prompts, temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=3, seed=0)
    for prompt, prompt_ids, response_ids, text in zip(prompts, out.prompt_ids, out.response_ids, out.texts):
        assert prompt_ids == tok(prompt)["input_ids"]
        # Up to and including the first EOS, else the whole budget; nothing after it.
        assert (response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in response_ids[:-1]) or (
            len(response_ids) == 8 and tok.eos_token_id not in response_ids)
        assert tok.decode(response_ids, skip_special_tokens=True) == text
