"""The objectives: one LightningModule base (:mod:`.base`) and a small class per objective, by family.

Each objective states what its loss reads (``needs``) and gives its loss once, per pair
(``pair_loss``); see :mod:`.drdo` for the shape to copy.
"""

from drdo_lightning.objectives.base import PreferenceModule
from drdo_lightning.objectives.distillation import EDPO, Distill
from drdo_lightning.objectives.dpo_family import CDPO, DPO, IPO, RDPO, RPO
from drdo_lightning.objectives.drdo import DRDO
from drdo_lightning.objectives.outputs import Needs, PairLoss, PairOutputs
from drdo_lightning.objectives.reference import ReferenceModule
from drdo_lightning.objectives.reference_free import ORPO, SimPO
from drdo_lightning.objectives.supervised import SFT, OracleRewardModel

__all__ = [
    "CDPO", "DPO", "DRDO", "EDPO", "IPO", "ORPO", "RDPO", "RPO", "SFT", "Distill", "Needs", "OracleRewardModel",
    "PairLoss", "PairOutputs", "PreferenceModule", "ReferenceModule", "SimPO",
]
