"""DRDO (Direct Reward Distillation and policy-Optimization) and its baselines in Lightning."""

from drdo_lightning.data import PreferenceDataModule
from drdo_lightning.export import ExportHuggingFace
from drdo_lightning.models import CausalLMWithRewardHead
from drdo_lightning.modules import DPO, DRDO, EDPO, IPO, SFT, Distill, OracleRewardModel, PreferenceModule, ReferenceModule

__all__ = [
    "DPO",
    "DRDO",
    "EDPO",
    "IPO",
    "Distill",
    "ReferenceModule",
    "SFT",
    "CausalLMWithRewardHead",
    "ExportHuggingFace",
    "OracleRewardModel",
    "PreferenceDataModule",
    "PreferenceModule",
]
