"""The scale of the Oracle margins a distilling objective regresses onto.

A squared distillation term's pull grows with the scale of its target ``Δr* = r*(x, y_w) - r*(x, y_l)``,
and that scale depends on how the Oracle was trained (one epoch at a small learning rate gives small
margins; an Oracle trained to its best held-out accuracy large ones). DRDO's ``alpha`` weighs its
preference term against this pull, so the same ``alpha`` means something else for another Oracle.
This piece puts the scale in the user's hands, for every distilling objective alike (DRDO, Distill,
e-DPO): the target becomes ``Δr* * scale``, or ``Δr* * scale / sd(Δr*)`` with ``normalization="std"``,
the standard deviation taken once over the training pairs (per ensemble member for e-DPO), recorded
in the run's checkpoints and hyperparameters, and written beside an export.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

from drdo_lightning.data.columns import ExampleColumns
from drdo_lightning.errors import DataError

log = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "std")
SCORE_COLUMNS = ("chosen_score", "rejected_score")


def margin_std(chosen: Tensor, rejected: Tensor) -> Tensor:
    """The standard deviation of ``Δr*`` over pairs (dimension 0): a scalar, or ``[K]`` for an ensemble's ``[N, K]``."""
    margins = (chosen - rejected).double()
    if margins.shape[0] < 2:
        raise DataError(f"normalising the Oracle margins needs at least 2 training pairs, found {margins.shape[0]}")
    std = margins.std(dim=0)
    if bool((std == 0).any()):
        raise DataError("the Oracle margins of the training pairs do not vary (standard deviation 0): they cannot be "
                        "normalised; use --model.target_normalization none")
    return std.float()


class OracleTarget:
    """``Δr*`` scaled as the objective's options ask; ``multiplier`` is what the scores are multiplied by."""

    def __init__(self, scale: float = 1.0, normalization: Literal["none", "std"] = "none") -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"target_normalization must be one of {NORMALIZATIONS}, not {normalization!r}")
        if scale <= 0:
            raise ValueError(f"target_scale must be positive, not {scale}")
        self.scale, self.normalization = scale, normalization
        self.std: Tensor | None = None  # sd(Δr*) over the training pairs, once measured

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.normalization == "none"

    @property
    def multiplier(self) -> Tensor:
        if self.normalization == "none":
            return torch.tensor(self.scale)
        if self.std is None:
            raise RuntimeError("the Oracle margins' standard deviation is measured when fitting starts (fit_to)")
        return self.scale / self.std

    def fit_to(self, data: ExampleColumns) -> None:
        """Measure ``sd(Δr*)`` on ``data``'s training split (only for ``normalization="std"``)."""
        if self.normalization != "std":
            return
        chosen, rejected = (torch.tensor(data.column("train", name), dtype=torch.float64) for name in SCORE_COLUMNS)
        self.std = margin_std(chosen, rejected)
        log.info("Oracle margins: sd %s over %d training pairs; the distillation target is Δr* x %s",
                 _numbers(self.std), chosen.shape[0], _numbers(self.multiplier))

    def scaled(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` with its Oracle score columns multiplied (only differences of scores enter a loss)."""
        if self.is_identity:
            return batch
        m = self.multiplier.to(batch[SCORE_COLUMNS[0]].device)
        return {**batch, **{name: batch[name] * m for name in SCORE_COLUMNS}}

    def record(self) -> dict[str, float | list[float] | str]:
        """What the student was trained against, for checkpoints and exports."""
        record: dict = {"target_scale": self.scale, "target_normalization": self.normalization}
        if self.normalization == "none" or self.std is not None:
            record["target_multiplier"] = self.multiplier.tolist()
        if self.std is not None:
            record["oracle_margin_std"] = self.std.tolist()
        return record

    def restore(self, record: dict) -> None:
        """Take back the measured ``sd(Δr*)`` of a checkpoint's :meth:`record` (a resumed run keeps its target)."""
        if "oracle_margin_std" in record:
            self.std = torch.tensor(record["oracle_margin_std"], dtype=torch.float32)


def _numbers(t: Tensor) -> str:
    return ", ".join(f"{v:.4g}" for v in t.flatten().tolist())
