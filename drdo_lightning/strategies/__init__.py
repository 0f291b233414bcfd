"""Sharding strategies for every recipe: DeepSpeed ZeRO-2/3 (:mod:`.deepspeed`) and FSDP (:mod:`.fsdp`).

``drdo_lightning.strategies.DeepSpeedStrategy`` and ``drdo_lightning.strategies.FSDPStrategy`` name
them in YAML; each is imported on first use, so FSDP runs without DeepSpeed installed.
"""

from __future__ import annotations

import importlib

HOMES = {"DeepSpeedStrategy": "deepspeed", "cpu_adamw": "deepspeed", "FSDPStrategy": "fsdp"}


def __getattr__(name: str):
    if name not in HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
