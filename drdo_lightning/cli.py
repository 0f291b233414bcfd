"""Command line: ``python -m drdo_lightning COMMAND [options]`` (or ``drdo-lightning COMMAND``).

Every command is in :data:`COMMANDS`, which ``--help`` lists by group. ``fit`` and ``validate``
are a LightningCLI (:mod:`training`): every constructor argument of the objective (``--model``),
of :class:`PreferenceDataModule` (``--data``) and of the Trainer is an option and a YAML key. The
other commands are typed functions: their signature is their command line. In every command
``--config`` takes a shipped recipe name (``drdo``) or a YAML path.

A :class:`~drdo_lightning.errors.UserError` (a missing path, bad data) ends the command with one
line on stderr and exit status 2; a data error names the option of the running command that fixes it.

A command's module is imported when the command runs: ``--help`` and a mistyped command answer
without importing torch, Lightning or transformers.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jsonargparse import CLI

from drdo_lightning.errors import DataError, UserError
from drdo_lightning.recipes import expand_config_args, recipe_names

PROGRAM = "python -m drdo_lightning"
PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Command:
    """One command: its group in ``--help``, its one-line summary, and how it runs its arguments."""

    name: str
    group: str
    summary: Callable[[], str]  # read when --help lists it: a function command's comes from its source
    run: Callable[[list[str]], Any]
    data_option: Callable[[str], str | None]  # a data setting -> this command's option for it, if any
    function: Callable[[], Callable] | None = None  # a typed function's command, imported: its parameters are its options


def load(target: str) -> Any:
    """What ``target`` names, ``"module:name"`` in this package (``"scoring:score"``), imported."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def docstring_summary(target: str) -> str:
    """The first line of the docstring of the function ``target`` names (as :func:`load`), read from
    its module's source: the listing in ``--help`` imports none of the commands' modules."""
    module, _, name = target.partition(":")
    source = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    functions = [node for node in ast.parse(source.read_text(encoding="utf-8")).body
                 if isinstance(node, ast.FunctionDef) and node.name == name]
    if not functions:
        raise LookupError(f"{source} defines no function {name}")
    return ast.get_docstring(functions[0]).splitlines()[0]


def _training(name: str, summary: str) -> Command:
    def run(argv: list[str]) -> Any:
        return load("training:lightning_cli")([name, *argv])

    return Command(name, "training", lambda: summary, run, lambda s: f"--data.{s}")


def _function(name: str, group: str, target: str, defaults: str | None = None) -> Command:
    """The typed function ``target`` (as :func:`load`) as a command; ``defaults``, a target too,
    fill parameters the library leaves to the caller."""

    def run(argv: list[str]) -> Any:
        return CLI(load(target), args=expand_config_args(argv, with_base=False), as_positional=False,
                   set_defaults=load(defaults) if defaults else None)

    def data_option(setting: str) -> str | None:
        return f"--{setting}" if setting in inspect.signature(load(target)).parameters else None

    return Command(name, group, lambda: docstring_summary(target), run, data_option, lambda: load(target))


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        _training("fit", "Train an objective (SFT, Oracle, DRDO, DPO, IPO, cDPO, rDPO, RPO, SimPO, ORPO, distillation, e-DPO) from a recipe."),
        _training("validate", "Validation metrics of a trained checkpoint (--ckpt_path) on the validation pairs."),
        _function("score", "data and models", "scoring:score"),
        _function("export", "data and models", "export:export"),
        _function("train-ensemble", "data and models", "stages:train_ensemble"),
        _function("evaluate", "evaluation", "evaluating:evaluate", "embedded_default:EVALUATE_DEFAULTS"),
        _function("protocol", "experiments", "experiments.protocol:protocol"),
        _function("ablations", "experiments", "experiments.ablations:ablations"),
        _function("splits", "experiments", "data.splits:splits"),
        _function("paper-pipeline", "experiments", "experiments.pipeline:paper_pipeline"),
        _function("build-embedded-default", "embedded default", "embedded_default.build:build_embedded_default"),
    )
}


# Optional packages -> the extra of pyproject.toml that installs each.
EXTRAS = {"peft": "peft", "deepspeed": "deepspeed", "accelerate": "deepspeed", "tensorboard": "trackers",
          "wandb": "trackers", "trl": "bench", "matplotlib": "test"}


def missing_extra(error: ModuleNotFoundError) -> tuple[str, str] | None:
    """``(package, extra)`` when ``error`` is the import of an optional package failing; else None."""
    name = (error.name or "").split(".")[0]
    return (name, EXTRAS[name]) if name in EXTRAS else None


def usage() -> str:
    """The top-level help: every command by group with its summary, and the shipped recipes."""
    lines = [f"usage: {PROGRAM} COMMAND [options]", "",
             "DRDO and its baselines in PyTorch Lightning. `COMMAND --help` lists a command's options;",
             "`--config` takes a shipped recipe name or a YAML file."]
    for group in dict.fromkeys(c.group for c in COMMANDS.values()):
        lines += ["", f"{group}:"]
        lines += [f"  {c.name:<24}{c.summary()}" for c in COMMANDS.values() if c.group == group]
    return "\n".join([*lines, "", "recipes: " + ", ".join(recipe_names())])


def main(args: list[str] | None = None) -> Any:
    """Run a command; returns the LightningCLI (``fit``, ``validate``) or the function's result."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    command = COMMANDS.get(argv[0])
    if command is None:
        from drdo_lightning.suggestions import did_you_mean

        print(f"error: unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        raise SystemExit(2)
    # The shipped task registers its folder (errors about paths in it name the build, and own data
    # beside it sets its defaults aside) and its gold judge, before any command reads a path.
    importlib.import_module("drdo_lightning.embedded_default")
    try:
        return command.run(argv[1:])
    except SystemExit as e:
        if e.code == 2:  # the parser refused an argument: name the nearest option it takes
            from drdo_lightning import suggestions

            known = suggestions.function_options(command.function()) if command.function else suggestions.training_options()
            print(*(f"error: {hint}" for hint in suggestions.option_hints(argv[1:], known)), sep="\n", file=sys.stderr)
        raise
    except ModuleNotFoundError as e:
        extra = missing_extra(e)
        if extra is None:
            raise
        print(f"error: {extra[0]} is not installed; it comes with `pip install -e \".[{extra[1]}]\"` "
              f"(or `pip install {extra[0]}`)", file=sys.stderr)
        raise SystemExit(2) from None
    except UserError as e:
        message = e.for_option(command.data_option(e.setting)) if isinstance(e, DataError) and e.setting else str(e)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def console() -> None:
    """The installed ``drdo-lightning`` command: :func:`main`, with its result kept in Python.

    A console script exits with whatever its function returns, and a returned object (the
    LightningCLI, an output path) would be printed to stderr with exit status 1.
    """
    main()
