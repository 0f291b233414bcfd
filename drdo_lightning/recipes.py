"""The shipped recipes: found by name from anywhere, layered over one base, their run folder named once.

A recipe is a YAML file under ``configs/``: ``drdo`` names ``configs/drdo.yaml``,
``ablations/gamma0`` names ``configs/ablations/gamma0.yaml``. In a source checkout they are
read from the repository's ``configs/``; an installed wheel carries the same files inside the
package (``drdo_lightning/configs``). ``--config`` takes a recipe name or a path to any YAML file.

Training runs (``fit``, ``validate``) given a recipe read ``configs/base.yaml`` first: the trainer,
logger and callbacks every recipe shares. A layer alone (``strategies/*``, ``ablations/*``) brings
no base, so it can be added to a run configured by options only. Its directories are written in terms of
``${trainer.default_root_dir}`` (:data:`RUN_DIR`), which :func:`resolve_run_dir` replaces by the
run folder the recipe, or the command line, sets.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from drdo_lightning.errors import UserError
from drdo_lightning.suggestions import did_you_mean

RUN_DIR = "${trainer.default_root_dir}"
BASE = "base"
# Folders of partial configs, layered over a recipe rather than run alone.
LAYER_FOLDERS = ("ablations", "strategies", "loggers", "data")


def recipes_dir() -> Path:
    """``drdo_lightning/configs`` in an installed wheel; the repository's ``configs/`` in a checkout."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def recipe_names() -> list[str]:
    """Every shipped config by name (``drdo``, ``ablations/gamma0``, ...), the base left out."""
    root = recipes_dir()
    names = (p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
    return sorted(n for n in names if n != BASE)


def config_path(config: str | Path) -> Path:
    """An existing YAML file as is; otherwise the shipped recipe of that name (``drdo``, ``drdo.yaml``)."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    packaged = recipes_dir() / Path(config).with_suffix(".yaml")
    if packaged.is_file():
        return packaged
    raise UserError(f"--config {config}: no such file, nor a shipped recipe{did_you_mean(str(config), recipe_names())} "
                    f"(recipes: {', '.join(recipe_names())})")


def base_config() -> Path:
    return recipes_dir() / f"{BASE}.yaml"


def read_config(config: str | Path) -> dict[str, Any]:
    """A config or recipe as a plain dictionary (not layered over the base)."""
    return yaml.safe_load(config_path(config).read_text()) or {}


def recipe_objective(config: str | Path) -> type:
    """The objective class (``model.class_path``) a recipe trains, e.g. :class:`DRDO` for ``drdo``."""
    module, name = read_config(config)["model"]["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def is_layer(path: Path) -> bool:
    """Whether a config file is one of the shipped partial configs (``ablations/*``, ``strategies/*``)."""
    return path.parent.name in LAYER_FOLDERS and path.parent.parent.resolve() == recipes_dir()


def expand_config_args(argv: list[str], *, with_base: bool) -> list[str]:
    """``argv`` (a command's arguments) with every ``--config NAME`` made a path and, ``with_base``,
    the base config first when a config is a recipe, so that everything else overrides it."""
    out: list[str] = []
    configs: list[Path] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        configs.append(config_path(value))
        out += ["--config", str(configs[-1])]
    if with_base and any(not is_layer(c) for c in configs):
        out = ["--config", str(base_config()), *out]
    return out


def resolve_run_dir(value: Any, run_dir: str) -> Any:
    """``value`` (a parsed config, or any part of one) with :data:`RUN_DIR` replaced by ``run_dir``
    in every string; namespaces, dictionaries and lists are changed in place."""
    if isinstance(value, str):
        return value.replace(RUN_DIR, run_dir)
    items = vars(value).items() if isinstance(value, Namespace) else value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in list(items):
        resolved = resolve_run_dir(item, run_dir)
        if isinstance(value, Namespace):
            setattr(value, key, resolved)
        else:
            value[key] = resolved
    return value
