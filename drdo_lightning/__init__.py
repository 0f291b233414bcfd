"""DRDO (Direct Reward Distillation and policy-Optimization) and its baselines in Lightning.

Each public name is imported from its module on first use (PEP 562 ``__getattr__``):
``import drdo_lightning`` alone imports neither torch nor Lightning, so the command line answers
``--help`` at once, and ``drdo_lightning.DRDO`` (a recipe's ``class_path``) imports what DRDO needs.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module of the package that defines it.
PUBLIC = {
    "CDPO": "objectives",
    "DPO": "objectives",
    "DRDO": "objectives",
    "EDPO": "objectives",
    "IPO": "objectives",
    "ORPO": "objectives",
    "RDPO": "objectives",
    "RPO": "objectives",
    "SimPO": "objectives",
    "Distill": "objectives",
    "ReferenceModule": "objectives",
    "SFT": "objectives",
    "OracleRewardModel": "objectives",
    "PreferenceModule": "objectives",
    "CausalLMWithRewardHead": "models",
    "ExportHuggingFace": "export",
    "PreferenceDataModule": "data.datamodule",
}

__all__ = list(PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *PUBLIC})
