"""Module paths from before the package was split into layers, and where each now lives.

``import drdo_lightning.modules`` (or a YAML ``class_path: drdo_lightning.fsdp.FSDPStrategy``) keeps
working: the old name is an alias of the new module, not a copy of it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD_TO_NEW = {
    "drdo_lightning.modules": "drdo_lightning.objectives",
    "drdo_lightning.fsdp": "drdo_lightning.strategies.fsdp",
    "drdo_lightning.safety": "drdo_lightning.reliability",
    "drdo_lightning.free_cores": "drdo_lightning.cpu_cores",
    "drdo_lightning.demo": "drdo_lightning.embedded_default.task",
    "drdo_lightning.pipeline": "drdo_lightning.experiments.pipeline",
}


class OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and hands out the module that now lives at the new one."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in OLD_TO_NEW:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(OLD_TO_NEW[spec.name])
        spec.loader_state = module.__spec__  # the import system is about to give it the old name's spec
        return module

    def exec_module(self, module) -> None:
        # The new module ran when it was imported; it only gets its own spec back.
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(OldPathFinder())
