"""Numerical parity with TRL 1.16 on the same model, batch and settings (fp32), wherever TRL
implements the same loss: rDPO, DPO + SFT (RPO), SimPO (through CPO) and ORPO.

Both sides read one batch built by our data module and one model loaded from the same directory.
TRL's loss comes from its trainers' own loss code (``DPOTrainer._compute_loss``, ``CPOTrainer`` and
``ORPOTrainer.get_batch_loss_metrics``); ours from the objective's forward and loss. Where TRL's
convention differs from our default, the option that selects TRL's is set and named here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from drdo_lightning import ORPO, RDPO, RPO, PreferenceDataModule, SimPO
from drdo_lightning.data.collation import PairCollator

trl = pytest.importorskip("trl")
RTOL = 1e-5


@pytest.fixture(scope="module")
def batch(tiny_model_dir, pairs16) -> dict[str, torch.Tensor]:
    """8 tokenized pairs of different lengths, right-padded (the layout TRL's trainers pad to)."""
    dm = PreferenceDataModule(train_file=str(pairs16), tokenizer=str(tiny_model_dir), cache_dir=None)
    dm.setup("fit")
    pairs = PairCollator(dm.tokenizer.pad_token_id)([dm.train_dataset[i] for i in range(8)])
    lengths = (pairs["chosen_labels"] != -100).sum(-1)
    assert len(set(lengths.tolist())) > 1  # the length conventions are put to the test
    return pairs


def ours(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    module.configure_model()
    module.policy.eval()
    with torch.no_grad():
        loss, _, _ = module.loss_and_outputs(batch, "val")
    return loss


def trl_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def tiny_dataset() -> Dataset:
    return Dataset.from_dict({"prompt": ["a b"] * 2, "chosen": [" c d"] * 2, "rejected": [" e"] * 2})


def trl_dpo_loss(tmp_path, tiny_model_dir, tokenizer, batch, ref, **config) -> torch.Tensor:
    """``DPOTrainer``'s loss on our batch, with precomputed reference log-probs ``ref``."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=trl_model(tiny_model_dir), args=args, train_dataset=tiny_dataset(),
                             processing_class=tokenizer)
    trainer.precompute_ref_logps = True  # read the reference log-probs from the inputs, as ours do
    inputs = {
        "input_ids": torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        "attention_mask": torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
        "completion_mask": torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).ne(-100).long(),
        "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1],
    }
    trainer.model.eval()
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, inputs, return_outputs=False)


def trl_pair_loss(trainer_class, config_class, tmp_path, tiny_model_dir, tokenizer, batch, **config) -> torch.Tensor:
    """``CPOTrainer``'s or ``ORPOTrainer``'s loss on our batch."""
    args = config_class(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_class(model=trl_model(tiny_model_dir), args=args, train_dataset=tiny_dataset(),
                                processing_class=tokenizer)
    trainer.model.eval()
    with torch.no_grad():
        loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="eval")
    return loss


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs unlike the policy's, so the log-ratio margin is far from 0."""
    generator = torch.Generator().manual_seed(0)
    n = batch["chosen_input_ids"].shape[0]
    return -30 - 10 * torch.rand(n, generator=generator), -30 - 10 * torch.rand(n, generator=generator)


def with_reference(batch, ref):
    return {**batch, "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}


@pytest.mark.parametrize("eps", [0.0, 0.2, 0.4])
def test_rdpo_equals_trl_robust(tmp_path, tiny_model_dir, tokenizer, batch, reference, eps):
    want = trl_dpo_loss(tmp_path, tiny_model_dir, tokenizer, batch, reference, loss_type=["robust"],
                        label_smoothing=eps, beta=0.5)
    got = ours(RDPO(str(tiny_model_dir), beta=0.5, flip_rate=eps), with_reference(batch, reference))
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


def test_rpo_equals_trl_sigmoid_plus_sft_with_token_reduction(tmp_path, tiny_model_dir, tokenizer, batch, reference):
    want = trl_dpo_loss(tmp_path, tiny_model_dir, tokenizer, batch, reference, loss_type=["sigmoid", "sft"],
                        loss_weights=[1.0, 0.7], beta=0.3)
    token = ours(RPO(str(tiny_model_dir), beta=0.3, nll_weight=0.7, nll_reduction="token"), with_reference(batch, reference))
    torch.testing.assert_close(token, want, rtol=RTOL, atol=0)
    # Our default weighs every response alike: a different number on responses of different lengths.
    sequence = ours(RPO(str(tiny_model_dir), beta=0.3, nll_weight=0.7), with_reference(batch, reference))
    assert abs(sequence - want) > 1e-4


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (0.5, 0.0)])
def test_simpo_equals_trl_cpo_simpo(tmp_path, tiny_model_dir, tokenizer, batch, beta, gamma):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    want = trl_pair_loss(CPOTrainer, CPOConfig, tmp_path, tiny_model_dir, tokenizer, batch,
                         loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=0.0)
    got = ours(SimPO(str(tiny_model_dir), beta=beta, gamma=gamma), batch)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


def test_orpo_equals_trl_with_its_nll_over_prompt_and_response_tokens(tmp_path, tiny_model_dir, tokenizer, batch):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    want = trl_pair_loss(ORPOTrainer, ORPOConfig, tmp_path, tiny_model_dir, tokenizer, batch, beta=0.25)
    trl_like = ORPO(str(tiny_model_dir), odds_ratio_weight=0.25, nll_on_prompt=True, nll_reduction="token")
    torch.testing.assert_close(ours(trl_like, batch), want, rtol=RTOL, atol=0)
    # The paper's SFT term covers the response only (our default): another number.
    assert abs(ours(ORPO(str(tiny_model_dir), odds_ratio_weight=0.25), batch) - want) > 1e-4
