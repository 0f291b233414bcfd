"""How a trained model ranks preference pairs: per pair, a margin of the chosen over the rejected response.

Three margins, each positive when the model prefers the chosen response:

- ``logp``: ``z_w - z_l``, the difference of the summed response log-probabilities (the log-prob
  margin DRDO's preference term acts on, Eq. 6);
- ``implicit``: ``(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))``, the
  implicit reward difference of DPO, IPO and e-DPO divided by their β > 0 (a ranking needs its sign
  only), given the reference the policy started from;
- ``reward_head``: ``r(x, y_w) - r(x, y_l)`` of a model with a reward head (DRDO's student, the Oracle).

Every response is tokenized as training reads it (:func:`data.tokenization.tokenize_pairs`: the
tokenizer's BOS before the prompt, an EOS after the response, the same truncation) and its
log-probability taken at temperature 1 (:func:`divergence.response_logps`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from drdo_lightning.data.pairs import Columns, load_pairs
from drdo_lightning.data.tokenization import chat_renderer, load_tokenizer, tokenize_pairs
from drdo_lightning.evaluation.divergence import response_logps
from drdo_lightning.models import REWARD_HEAD_FILE, CausalLMWithRewardHead
from drdo_lightning.scoring import reward_columns

LOGP, IMPLICIT, REWARD_HEAD = "logp", "implicit", "reward_head"


def _tokenized(model_dir: str, pairs_file: str, max_prompt_length: int, max_length: int):
    tokenizer = load_tokenizer(model_dir)
    cols = Columns("prompt", "chosen", "rejected")
    pairs = load_pairs(pairs_file, cols, chat_renderer(tokenizer), on_bad_row="error")
    columns, _ = tokenize_pairs(pairs, tokenizer, max_prompt_length=max_prompt_length, max_length=max_length,
                                drop_long=False)
    return tokenizer, columns


def _logp_sides(model: CausalLMWithRewardHead, columns: dict, pad_token_id: int, batch_size: int) -> np.ndarray:
    """``[N, 2]``: the summed log-probabilities of the chosen and the rejected response."""
    return np.stack([response_logps(model, columns["prompt_ids"], columns[f"{side}_ids"], pad_token_id=pad_token_id,
                                    batch_size=batch_size) for side in ("chosen", "rejected")], axis=1)


@torch.inference_mode()
def pair_margins(
    model: str | Path,
    pairs_file: str | Path,
    *,
    reference: str | Path | None = None,
    max_prompt_length: int = 512,
    max_length: int = 1024,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Per pair of ``pairs_file`` (in file order), the margins of the module docstring that ``model`` has.

    ``logp`` always; ``implicit`` with a ``reference`` (a model of the same tokenizer);
    ``reward_head`` when ``model`` was saved with ``reward_head.safetensors``. Computed in float32.
    """
    model, pairs_file = str(model), str(pairs_file)
    tokenizer, columns = _tokenized(model, pairs_file, max_prompt_length, max_length)
    has_head = (Path(model) / REWARD_HEAD_FILE).is_file()
    policy = CausalLMWithRewardHead.from_pretrained(model, reward_head=has_head).float().eval()
    logps = _logp_sides(policy, columns, tokenizer.pad_token_id, batch_size)
    margins = {LOGP: logps[:, 0] - logps[:, 1]}
    if has_head:
        examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
        rewards = reward_columns(policy, examples, tokenizer.pad_token_id, batch_size=batch_size,
                                 sides=("chosen", "rejected"), desc="reward margins")
        margins[REWARD_HEAD] = np.asarray(rewards["chosen"]) - np.asarray(rewards["rejected"])
    del policy
    if reference is not None:
        ref = CausalLMWithRewardHead.from_pretrained(str(reference), reward_head=False).float().eval()
        ref_logps = _logp_sides(ref, columns, tokenizer.pad_token_id, batch_size)
        ratios = logps - ref_logps
        margins[IMPLICIT] = ratios[:, 0] - ratios[:, 1]
    return margins
