"""DRDO (Direct Reward Distillation and policy-Optimization) and its baselines in Lightning."""

from drdo_lightning import moved
from drdo_lightning.data.datamodule import PreferenceDataModule
from drdo_lightning.export import ExportHuggingFace
from drdo_lightning.models import CausalLMWithRewardHead
from drdo_lightning.objectives import (
    CDPO,
    DPO,
    DRDO,
    EDPO,
    IPO,
    ORPO,
    RDPO,
    RPO,
    SFT,
    Distill,
    OracleRewardModel,
    PreferenceModule,
    ReferenceModule,
    SimPO,
)

moved.install()

__all__ = [
    "CDPO",
    "DPO",
    "DRDO",
    "EDPO",
    "IPO",
    "ORPO",
    "RDPO",
    "RPO",
    "SimPO",
    "Distill",
    "ReferenceModule",
    "SFT",
    "CausalLMWithRewardHead",
    "ExportHuggingFace",
    "OracleRewardModel",
    "PreferenceDataModule",
    "PreferenceModule",
]
