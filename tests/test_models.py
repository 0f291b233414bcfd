import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from drdo_lightning import CausalLMWithRewardHead, logprobs
from drdo_lightning.heads import Wanted, sequence_values
from drdo_lightning.models import REWARD_HEAD_FILE
from drdo_lightning.positions import last_token_index


@pytest.fixture
def model(tiny_lm):
    torch.manual_seed(0)
    return CausalLMWithRewardHead(tiny_lm, CausalLMWithRewardHead.new_reward_head(tiny_lm.config.hidden_size)).eval()


def pad(seqs, side, pad_id=0):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
    return ids, mask


def test_last_token_index_left_and_right():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


@pytest.fixture(params=["llama", "gpt2"])
def any_model(request, model):
    """Llama (rotary positions) and GPT-2 (absolute positions, sensitive to left padding)."""
    if request.param == "llama":
        return model
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    return CausalLMWithRewardHead(lm, CausalLMWithRewardHead.new_reward_head(32)).eval()


def test_left_and_right_padding_give_the_same_rewards_and_logps(any_model):
    model = any_model
    seqs = [[1, 5, 9, 13, 7, 2], [1, 4, 4], [1, 8, 9, 10, 11, 12, 13, 14, 2]]
    prompt_len = 2
    outs = {}
    for side in ("left", "right"):
        ids, mask = pad(seqs, side)
        labels = ids.masked_fill(mask == 0, -100)
        for row in range(len(seqs)):  # mask each row's prompt
            first = int(mask[row].nonzero()[0])
            labels[row, first : first + prompt_len] = -100
        with torch.no_grad():
            out = model(ids, mask)
        outs[side] = (out.rewards, logprobs.sequence_logps(out.logits, labels))
    torch.testing.assert_close(outs["left"][0], outs["right"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["left"][1], outs["right"][1], atol=1e-4, rtol=1e-5)
    # Unpadded single sequences agree with the batch too.
    with torch.no_grad():
        alone = model(torch.tensor([seqs[1]]), torch.ones(1, 3, dtype=torch.long)).rewards
    torch.testing.assert_close(alone[0], outs["right"][0][1], atol=1e-5, rtol=1e-5)


def test_forward_logits_match_the_wrapped_lm_and_rewards_method(model):
    ids, mask = pad([[1, 5, 9, 13], [1, 4, 6, 8]], "right")
    with torch.no_grad():
        out = model(ids, mask)
        torch.testing.assert_close(out.logits, model.lm(input_ids=ids, attention_mask=mask).logits)
        torch.testing.assert_close(model.rewards(ids, mask), out.rewards)


def test_save_and_load_round_trip_and_atomic_replace(model, tiny_tokenizer, tmp_path):
    path = tmp_path / "export"
    model.save_pretrained(path, tokenizer=tiny_tokenizer)
    assert (path / REWARD_HEAD_FILE).is_file() and (path / "model.safetensors").is_file()
    ids, mask = pad([[1, 5, 9, 13, 7, 2]], "right")
    reloaded = CausalLMWithRewardHead.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask).rewards, model(ids, mask).rewards)
        torch.testing.assert_close(reloaded(ids, mask).logits, model(ids, mask).logits)
    # Saving again replaces the directory whole, leaving no staging directories behind.
    with torch.no_grad():
        model.reward_head.bias.fill_(3.0)
    model.save_pretrained(path, tokenizer=tiny_tokenizer)
    assert CausalLMWithRewardHead.from_pretrained(path).reward_head.bias.item() == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_loading_a_plain_lm_adds_a_fresh_head_only_when_asked(tiny_model_dir):
    assert CausalLMWithRewardHead.from_pretrained(tiny_model_dir, reward_head=False).reward_head is None
    with_head = CausalLMWithRewardHead.from_pretrained(tiny_model_dir)
    assert with_head.reward_head.weight.shape == (1, with_head.lm.config.hidden_size)
    with pytest.raises(ValueError, match="no reward head"):
        CausalLMWithRewardHead.from_pretrained(tiny_model_dir, reward_head=False).rewards(
            torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
        )


@pytest.mark.parametrize("average", [False, True])
def test_sequence_values_returns_the_token_unlikelihood_from_the_same_forward_when_asked(model, padded_responses, average):
    torch.manual_seed(0)
    ids, mask, labels = padded_responses("left")
    logps, rewards, unlikelihood, *_ = sequence_values(model, ids, mask, labels, Wanted(average=average, token_unlikelihood=True))
    plain = sequence_values(model, ids, mask, labels, Wanted(average=average))
    assert [torch.equal(a, b) for a, b in zip((logps, rewards), plain[:2])] == [True, True]
    token = torch.log_softmax(model(ids, mask).logits[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))[..., 0]
    response = labels[:, 1:] != -100
    want = (torch.log(-torch.expm1(token)) * response).sum(-1)
    if average:
        want = want / response.sum(-1)
    torch.testing.assert_close(unlikelihood.double(), want, atol=1e-5, rtol=1e-5)
    assert (unlikelihood < 0).all()
