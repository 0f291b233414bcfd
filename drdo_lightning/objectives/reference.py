"""The base of the objectives that compare the policy with a frozen reference policy (DPO and its
variants, IPO, reward distillation, e-DPO)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor

from drdo_lightning.models import CausalLMWithRewardHead
from drdo_lightning.errors import SettingError
from drdo_lightning.objectives.base import PreferenceModule, frozen
from drdo_lightning.objectives.outputs import PairOutputs
from drdo_lightning.objectives.reference_logps import COLUMNS, attach, cache_file, compute


def implicit_reward_metrics(out: PairOutputs, ref: tuple[Tensor, Tensor], beta: float) -> dict[str, Tensor]:
    """Per pair: DPO-style implicit rewards ``beta * (z - z_ref)``, whether the chosen one is larger, and their margin."""
    chosen = beta * (out.chosen_logps - ref[0]).detach()
    rejected = beta * (out.rejected_logps - ref[1]).detach()
    return {
        "reward_accuracy": (chosen > rejected).float(),
        "reward_margin": chosen - rejected,
        "chosen_rewards": chosen,
        "rejected_rewards": rejected,
    }


class ReferenceModule(PreferenceModule):
    """Adds a frozen reference policy, whose log-probs the batch carries as ``ref_chosen_logps`` and
    ``ref_rejected_logps`` when the loss is computed.

    The reference is a frozen copy of the starting policy (no second download), or the model at
    ``reference_model``. With LoRA (``lora``) it is the policy itself with its adapters switched off,
    which computes the starting policy: no copy at all. With ``precompute_reference=True`` its
    log-probs are computed once before training and attached to the data as columns, cached beside
    the tokenized data (:mod:`drdo_lightning.objectives.reference_logps`), so training holds one model
    in memory. A live reference runs once per step, before the policy's forward. Online
    (``online``) the reference is live: sampled pairs have no precomputed columns; it is also the
    start the KL estimate measures from.

    Args:
        reference_model: Path or hub id of the reference; default: the starting ``model``.
        precompute_reference: Precompute reference log-probs instead of running the
            reference live.
    """

    frozen_models = ("reference", *PreferenceModule.frozen_models)
    has_start = True

    def __init__(
        self, model: str, reference_model: str | None = None, precompute_reference: bool = False, **kwargs
    ) -> None:
        super().__init__(model, **kwargs)
        self.save_hyperparameters()
        if precompute_reference and self.online is not None:
            raise SettingError("precompute_reference computes the reference's log-probs of the data's pairs before "
                               "training, and online pairs are sampled during it: use --model.precompute_reference false")
        self.reference: CausalLMWithRewardHead | None = None

    @property
    def reference_path(self) -> str:
        return self.hparams.reference_model or self.hparams.model

    def load_reference(self) -> CausalLMWithRewardHead:
        return frozen(CausalLMWithRewardHead.from_pretrained(
            self.reference_path, reward_head=False, trust_remote_code=self.hparams.trust_remote_code
        ))

    @property
    def reference_is_base(self) -> bool:
        """The reference is the policy's base model, run with its adapters off."""
        return self.hparams.lora is not None and self.hparams.reference_model is None

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference is not None or self.hparams.precompute_reference or self.reference_is_base:
            return
        if hasattr(next(self.policy.parameters()), "ds_shape"):
            raise ValueError(
                "a live reference model is not supported under DeepSpeed ZeRO-3 (its parameters are sharded); "
                "use --model.precompute_reference true"
            )
        if self.hparams.reference_model is None:
            self.reference = frozen(CausalLMWithRewardHead(copy.deepcopy(self.policy.lm)))
        else:
            self.reference = self.load_reference()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.precompute_reference:
            data = self.trainer.datamodule
            device = self.trainer.strategy.root_device
            attach(
                data, self.trainer, cache_file(data, self.reference_path, self.hparams.average_logps),
                lambda: compute(data, self.load_reference(), lambda b, m: self.forward_pairs(b, model=m), device),
            )

    def prepare_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with the reference's log-probs as columns: precomputed ones as they are, else a
        no-grad forward of the live reference (once per step, whether the loss is then fused or not)."""
        batch = super().prepare_batch(batch)
        if COLUMNS[0] in batch:
            return batch
        if self.reference is None and not self.reference_is_base:
            raise RuntimeError("precompute_reference=True but the batch has no reference log-probs")
        with torch.no_grad(), self.starting_policy() as reference:
            out = self.forward_pairs(batch, model=reference)
        return {**batch, COLUMNS[0]: out.chosen_logps, COLUMNS[1]: out.rejected_logps}

    @contextlib.contextmanager
    def starting_policy(self) -> Iterator[CausalLMWithRewardHead | None]:
        """The live reference: the frozen model, or the policy's base with its adapters off (None when precomputed)."""
        if self.reference is not None:
            yield self.reference
        else:
            with super().starting_policy() as start:
                yield start


def reference_of(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(z_w^ref, z_l^ref)`` from a batch that :meth:`ReferenceModule.prepare_batch` prepared."""
    return batch[COLUMNS[0]], batch[COLUMNS[1]]
