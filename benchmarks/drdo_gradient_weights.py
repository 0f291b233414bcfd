"""Where DRDO's preference gradient goes: per-pair push on chosen and rejected log-probs.

For a policy and a preference file, computes z_w = log pi(y_w|x) and z_l = log pi(y_l|x) for the
first ``--pairs`` training pairs, then differentiates the preference term of Eq. 6,
-alpha (1 - p_w)^gamma (z_w - log(1 - e^{z_l})), with respect to z_w and z_l (autograd through
``losses.drdo_terms``; closed form in tests/test_losses.py). Prints how the push-up of the chosen
response (-dL/dz_w) and the push-down of the rejected one (dL/dz_l) are spread over pairs by
p_w = sigmoid(z_w - z_l), next to DPO's at its start (policy = reference, h = 0: beta/2 both ways
for every pair).

    .venv/bin/python benchmarks/drdo_gradient_weights.py                       # the embedded default's SFT policy
    .venv/bin/python benchmarks/drdo_gradient_weights.py --policy runs/robustness/flip_0.0/seed_0/drdo/export
"""

from __future__ import annotations

import argparse

import torch

from drdo_lightning.data.datamodule import PreferenceDataModule
from drdo_lightning.heads import sequence_values
from drdo_lightning.losses import drdo_terms
from drdo_lightning.models import CausalLMWithRewardHead

BINS = ((0.0, 0.05), (0.05, 0.3), (0.3, 0.7), (0.7, 0.95), (0.95, 1.0))


def response_logps(policy: str, train_file: str, pairs: int, max_prompt_length: int, max_length: int,
                   batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """z_w and z_l of ``policy`` on the first ``pairs`` training pairs (in the data module's order)."""
    data = PreferenceDataModule(train_file=train_file, val_fraction=0.1, tokenizer=policy,
                                max_prompt_length=max_prompt_length, max_length=max_length, batch_size=batch_size)
    data.setup("fit")
    model = CausalLMWithRewardHead.from_pretrained(policy).eval()
    zw, zl = [], []
    with torch.no_grad():
        for batch in data.train_dataloader():
            for side, out in (("chosen", zw), ("rejected", zl)):
                z = sequence_values(model, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"]).logps
                out.append(z)
            if sum(len(z) for z in zw) >= pairs:
                break
    return torch.cat(zw)[:pairs], torch.cat(zl)[:pairs]


def gradient_weights(zw: torch.Tensor, zl: torch.Tensor, alpha: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the push-up -dL/dz_w and push-down dL/dz_l of Eq. 6's preference term."""
    zw, zl = zw.detach().double().requires_grad_(), zl.detach().double().requires_grad_()
    zeros = torch.zeros_like(zw)
    preference = drdo_terms(zw, zl, zeros, zeros, zeros, zeros, alpha=alpha, gamma=gamma).preference
    grad_w, grad_l = torch.autograd.grad(preference.sum(), (zw, zl))
    return -grad_w, grad_l


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="embedded_default/sft_policy")
    parser.add_argument("--train-file", default="embedded_default/data/train.jsonl")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta, for the comparison line")
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    zw, zl = response_logps(args.policy, args.train_file, args.pairs, args.max_prompt_length, args.max_length)
    up, down = gradient_weights(zw, zl, args.alpha, args.gamma)
    margin = zw - zl
    p = torch.sigmoid(margin.double())
    print(f"{len(zw)} pairs; mean z_w {zw.mean():.1f}; margin z_w - z_l: mean {margin.mean():+.2f}, sd {margin.std():.2f}")
    print("| p_w | share of pairs | DRDO push-up of y_w | DRDO push-down of y_l | DPO at start (each) |")
    print("|---|---|---|---|---|")
    for low, high in BINS:
        inside = (p >= low) & ((p < high) if high < 1 else (p <= high))
        if inside.any():
            print(f"| [{low}, {high}{']' if high == 1 else ')'} | {inside.double().mean():.2f} | {up[inside].mean():.3f} "
                  f"| {down[inside].mean():.3f} | {args.beta / 2:.3f} |")
    wrong = p < 0.5
    print(f"pairs the policy ranks wrong (p_w < 0.5): {wrong.double().mean():.2f}; their share of the total push-down: "
          f"{down[wrong].sum() / down.sum():.2f}, of the push-up: {up[wrong].sum() / up.sum():.2f}")


if __name__ == "__main__":
    main()
