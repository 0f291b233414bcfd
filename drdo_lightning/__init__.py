"""DRDO (Direct Reward Distillation and policy-Optimization) and its baselines in Lightning."""

from drdo_lightning.data import PreferenceDataModule
from drdo_lightning.export import ExportHuggingFace
from drdo_lightning.models import CausalLMWithRewardHead
from drdo_lightning.modules import DRDO, SFT, OracleRewardModel, PreferenceModule

__all__ = [
    "DRDO",
    "SFT",
    "CausalLMWithRewardHead",
    "ExportHuggingFace",
    "OracleRewardModel",
    "PreferenceDataModule",
    "PreferenceModule",
]
