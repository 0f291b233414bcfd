"""The packages of the wheel, derived from the tree so that no new folder can be left out.

Every package under ``drdo_lightning/``, and the recipes: ``configs/`` and each folder in it ship as
``drdo_lightning/configs/...`` (where :mod:`drdo_lightning.recipes` finds them once installed) with
their YAML files. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

CONFIGS = Path("configs")
config_dirs = [CONFIGS, *sorted(d for d in CONFIGS.rglob("*") if d.is_dir() and any(d.glob("*.yaml")))]
config_packages = {".".join(("drdo_lightning", *d.parts)): str(d) for d in config_dirs}

setup(
    packages=[*find_packages(include=["drdo_lightning", "drdo_lightning.*"]), *config_packages],
    package_dir=config_packages,
    package_data={package: ["*.yaml"] for package in config_packages},
)
