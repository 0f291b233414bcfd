""""Did you mean": the nearest known name to a misspelt option or recipe name.

The command line prints :func:`option_hints` after the parser has refused an argument; recipes name
the nearest recipe in their error (:func:`did_you_mean`). Only names as close as ``difflib`` finds at
``CUTOFF`` are offered, so a word unlike every option gets no guess.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable, Iterable

CUTOFF = 0.75
# Options of fit and validate that are not a class's argument.
TRAINING_TOP_LEVEL = ("--config", "--print_config", "--seed_everything", "--ckpt_path", "--model", "--data",
                      "--trainer", "--optimizer", "--lr_scheduler", "--non_finite", "--cpu_threads", "--help")


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to ``word``, or None when none is near."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=CUTOFF)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the choice nearest to ``word``, or nothing."""
    match = closest(word, choices)
    return f"; did you mean {match}?" if match else ""


def _parameters(cls_or_fn: Callable) -> list[str]:
    target = cls_or_fn.__init__ if inspect.isclass(cls_or_fn) else cls_or_fn
    return [p.name for p in inspect.signature(target).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _subclasses(cls: type) -> list[type]:
    return [cls, *(s for sub in cls.__subclasses__() for s in _subclasses(sub))]


def training_options() -> set[str]:
    """The options of ``fit`` and ``validate``: every objective's (``--model.*``), the data module's,
    the Trainer's and the callbacks the command line always adds."""
    from lightning.pytorch import Trainer

    from drdo_lightning.cpu_cores import FollowFreeCores
    from drdo_lightning.data.datamodule import PreferenceDataModule
    from drdo_lightning.objectives import PreferenceModule
    from drdo_lightning.reliability import NonFiniteGuard

    groups = {"trainer": [Trainer], "data": [PreferenceDataModule], "non_finite": [NonFiniteGuard],
              "cpu_threads": [FollowFreeCores],
              "model": [k for cls in _subclasses(PreferenceModule) for k in cls.__mro__ if issubclass(k, PreferenceModule)]}
    options = {f"--{group}.{name}" for group, classes in groups.items() for cls in classes for name in _parameters(cls)}
    return options | set(TRAINING_TOP_LEVEL)


def function_options(fn: Callable) -> set[str]:
    """The options of a command that is a typed function: its parameters, and ``--config``."""
    return {f"--{name}" for name in _parameters(fn)} | {"--config", "--print_config", "--help"}


def option_hints(args: list[str], known: set[str]) -> list[str]:
    """``unknown option --x; did you mean --y?`` for every option in ``args`` that is none of
    ``known`` (nor an abbreviation of one, nor a key inside an option, as ``--trainer.callbacks.dirpath``)
    and has a near known name."""
    hints = []
    for arg in args:
        key = arg.split("=", 1)[0].rstrip("+")
        if not key.startswith("--") or any(k.startswith(key) or ("." in k and key.startswith(k + ".")) for k in known):
            continue
        if match := closest(key, known):
            hints.append(f"unknown option {key}; did you mean {match}?")
    return hints
