"""Tiny random causal LMs of the architectures users bring, built from transformers' config classes.

Each entry sets what makes its family differ from Llama where our code could get it wrong:
absolute or learned positions (GPT-2, OPT), a hidden state projected before the head (OPT-350M),
post-processing after the head (Gemma-2 soft-capping, Cohere's and Granite's logit scales),
tied embeddings, grouped-query attention, and dropout left on in the config. ``build`` then
scales the output embeddings so logits are large: a skipped soft-cap or scale cannot hide in
logits near zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
)

# Common to the Llama-like families: 2 layers, 4 query heads sharing 2 key/value heads.
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
DROPOUT = 0.1

ARCHITECTURES: dict[str, Callable[[int], PretrainedConfig]] = {
    "opt-125m-shape": lambda v: OPTConfig(
        vocab_size=v, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, dropout=DROPOUT, attention_dropout=DROPOUT, pad_token_id=0),
    # OPT-350M: post-layer-norm blocks, 64-wide states projected to 32 before the (tied) head.
    "opt-350m-shape": lambda v: OPTConfig(
        vocab_size=v, hidden_size=64, word_embed_proj_dim=32, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, do_layer_norm_before=False, dropout=DROPOUT, pad_token_id=0),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=128),  # dropout 0.1 by default
    "gpt-neox": lambda v: GPTNeoXConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, hidden_dropout=DROPOUT, attention_dropout=DROPOUT),
    "llama": lambda v: LlamaConfig(vocab_size=v, attention_dropout=DROPOUT, **LLAMA_LIKE),
    "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=None, **LLAMA_LIKE),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, attention_dropout=DROPOUT, **LLAMA_LIKE),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, head_dim=8, **LLAMA_LIKE),
    "phi3": lambda v: Phi3Config(vocab_size=v, pad_token_id=0, resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, **LLAMA_LIKE),
    "gemma2": lambda v: Gemma2Config(
        vocab_size=v, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=5.0, attn_logit_softcapping=50.0,
        sliding_window=4, pad_token_id=0, **LLAMA_LIKE),  # a window shorter than the test rows, as on real ones
    "gemma3-text": lambda v: Gemma3TextConfig(
        vocab_size=v, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=5.0, sliding_window=4,
        pad_token_id=0, **LLAMA_LIKE),
    "cohere": lambda v: CohereConfig(vocab_size=v, logit_scale=0.25, pad_token_id=0, **LLAMA_LIKE),
    "granite": lambda v: GraniteConfig(
        vocab_size=v, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
        **LLAMA_LIKE),
    # Beyond the common list: partial rotary with a biased head, and a parallel-residual family.
    "phi": lambda v: PhiConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, resid_pdrop=DROPOUT, embd_pdrop=DROPOUT),
    "stablelm": lambda v: StableLmConfig(vocab_size=v, hidden_dropout=DROPOUT, **LLAMA_LIKE),
}

LOGIT_STD = 20.0  # far beyond any soft-cap the tests set and where a 4x logit scale matters


def build(name: str, vocab_size: int, seed: int = 0):
    """The architecture's tiny random ``*ForCausalLM``, in eval mode, with large logits."""
    torch.manual_seed(seed)
    config = ARCHITECTURES[name](vocab_size)
    config.tie_word_embeddings = False  # scale the head without touching the input embeddings
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    head = lm.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, LOGIT_STD / head.weight.shape[1] ** 0.5)
    return lm.eval()
