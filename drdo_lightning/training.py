"""Training in process: the LightningCLI behind ``fit`` and ``validate``, and :func:`run_fit`.

:func:`run_fit` is what the experiments, the notebook and your scripts call: a recipe (or several
configs layered in order) plus overrides, and back comes a :class:`FitResult` read from the
trainer itself. Overrides are dotted keys (``{"model.model": path, "trainer.max_steps": 50}``)
merged into the recipe: they change those keys only, never the recipe's callbacks or logger
unless they name them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from unittest import mock

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from drdo_lightning.cpu_cores import FollowFreeCores
from drdo_lightning.data.datamodule import PreferenceDataModule
from drdo_lightning.export import ExportHuggingFace
from drdo_lightning.objectives import PreferenceModule, ReferenceModule
from drdo_lightning.recipes import expand_config_args, recipe_objective, resolve_run_dir
from drdo_lightning.reliability import CheckpointOnSigterm, NonFiniteGuard, unreadable_checkpoint

TRAINING_COMMANDS = ("fit", "validate")
# Logger classes -> the packages they log with (any one will do), the first the one to install.
LOGGER_PACKAGES: dict[type, tuple[str, ...]] = {TensorBoardLogger: ("tensorboard", "tensorboardX"), WandbLogger: ("wandb",)}


def _logger_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None  # not ours to report: the parser names a class path it cannot import


def check_logger_packages(logger: Any) -> None:
    """Raise :class:`ModuleNotFoundError` (its ``name`` the package) when a configured logger
    (``trainer.logger``, parsed) logs with a package that is not installed.

    Lightning finds out only when it builds the logger, inside jsonargparse's instantiation, which
    wraps its error (a bare ModuleNotFoundError without the module's name) in a long "Not a valid
    subclass of Logger" traceback, after seeding and with the model and data being built. Checked
    on the parsed class paths with ``find_spec`` (no import of the package), the error comes before
    anything runs and names the package, which the command line turns into one line naming the extra.
    """
    entries = logger if isinstance(logger, list) else [logger]
    for entry in entries:
        class_path = entry.get("class_path") if isinstance(entry, (Namespace, dict)) else None
        cls = _logger_class(class_path) if isinstance(class_path, str) else None
        for logger_class, packages in LOGGER_PACKAGES.items():
            if isinstance(cls, type) and issubclass(cls, logger_class) and not any(
                    importlib.util.find_spec(p) for p in packages):
                raise ModuleNotFoundError(f"{cls.__name__} logs with {packages[0]}, which is not installed",
                                          name=packages[0])


class DRDOCLI(LightningCLI):
    """LightningCLI over every objective (``--model``) and :class:`PreferenceDataModule` (``--data``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test and predict are left out: no module has a test_step or predict_step.
        return {k: v for k, v in LightningCLI.subcommands().items() if k in TRAINING_COMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenized with the model's own tokenizer.
        parser.link_arguments("model.init_args.model", "data.tokenizer")
        # Always on: non-finite steps are skipped and counted; --non_finite.max_consecutive in a row stop the run.
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite")
        # Always on: on CPU, torch's thread count follows the cores other processes leave free.
        parser.add_lightning_class_args(FollowFreeCores, "cpu_threads")

    def parse_arguments(self, parser, args) -> None:
        # The whole command line comes in ``args``; LightningCLI would warn whenever sys.argv holds
        # arguments too (a fit nested in a sweep, a notebook kernel, pytest). Only parsing sees the
        # trimmed argv: launchers that re-run the script still read the real one.
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            super().parse_arguments(parser, args)
        # Before seeding and building anything: a tracker without its package is one line, not a traceback.
        subcommand = self.config.get("subcommand")
        check_logger_packages((self.config[subcommand] if subcommand else self.config).get("trainer.logger"))

    def before_fit(self) -> None:
        self.model.check_data(self.datamodule)

    def before_validate(self) -> None:
        self.model.check_data(self.datamodule)

    def before_instantiate_classes(self) -> None:
        # The base config writes the run's folders as ${trainer.default_root_dir} (recipes.RUN_DIR).
        config = self.config[self.subcommand]
        resolve_run_dir(config, str(config.trainer.default_root_dir or "."))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the model's hyperparameters from --ckpt_path (weights-only) before the
        # Trainer loads it: an unreadable file fails here first, so name it here too.
        try:
            super()._parse_ckpt_path()
        except Exception as e:
            raise unreadable_checkpoint(self.config[self.config.subcommand].get("ckpt_path"), e) from e


def lightning_cli(argv: Sequence[str]) -> DRDOCLI:
    """Run ``fit`` or ``validate`` from command-line arguments; ``--config`` takes recipe names too."""
    return DRDOCLI(
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        # Checkpoints are written atomically and loaded weights-only; SIGTERM saves one (drdo_lightning.reliability).
        trainer_defaults={
            "plugins": [{"class_path": "drdo_lightning.reliability.AtomicCheckpointIO"}],
            "callbacks": [CheckpointOnSigterm()],
        },
        args=[argv[0], *expand_config_args(list(argv[1:]), with_base=True)],
    )


@dataclass(frozen=True)
class FitResult:
    """What a finished ``fit`` left behind, read from its trainer.

    Attributes:
        run_dir: The run folder (``trainer.default_root_dir``).
        export_dir: The Hugging Face export (None without an :class:`ExportHuggingFace` callback).
        checkpoint_dir: Where checkpoints went (None without checkpointing).
        log_dir: The logger's folder of this run (None without a logger).
        global_step: Optimizer steps taken.
        metrics: The last value of every logged metric (``train/loss``, ``val/loss``, ...); with an
            export of the best checkpoint (``ExportHuggingFace(weights="best")``), also the exported
            checkpoint's monitored score and step, ``selected/<monitor>`` (e.g.
            ``selected/val/reward_accuracy``) and ``selected/step``.
    """

    run_dir: Path
    export_dir: Path | None
    checkpoint_dir: Path | None
    log_dir: Path | None
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)

    def stage_metrics(self, stage: str = "val") -> dict[str, float]:
        """The metrics of one stage without its prefix: ``{"loss": ...}`` for ``val/loss``."""
        prefix = f"{stage}/"
        return {k[len(prefix):]: v for k, v in self.metrics.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class DataSpec:
    """How a run reads its pairs: the same token budgets and chat template in every training stage
    and in scoring, so the judges score exactly what the students train on."""

    max_prompt_length: int = 512
    max_length: int = 1024
    chat_template: str | None = None

    def fit_overrides(self) -> dict[str, Any]:
        return {f"data.{k}": v for k, v in vars(self).items()}

    def score_options(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class RunSpec:
    """One training run as code describes it: :func:`run_fit` turns it into the recipe's options.

    Attributes:
        recipe: A recipe name (``drdo``) or YAML path, or several layered in order
            (``("drdo", "ablations/gamma0")``); the base config lies under them.
        run_dir: The run folder (``trainer.default_root_dir``); default: the recipe's.
        model: The starting model (``model.model``).
        train_file, val_file: The pairs (``data.train_file``, ``data.val_file``).
        data: Token budgets and chat template.
        label_flip_rate, flip_seed: Labels flipped in training, and the seed that picks them.
        seed: ``seed_everything``.
        max_steps: The budget in optimizer steps.
        validate: ``False`` skips validation (``trainer.limit_val_batches 0``), as sweeps that
            judge the final policy do.
        one_model_in_memory: Reference-based objectives precompute their reference log-probs
            instead of holding a second model (reference-free ones have none).
        overrides: Any other option as a dotted key, e.g. ``{"model.learning_rate": 3e-4}``; they
            win over the fields above.
    """

    recipe: str | Path | tuple[str | Path, ...]
    run_dir: Path | None = None
    model: str | Path | None = None
    train_file: str | Path | None = None
    val_file: str | Path | None = None
    data: DataSpec | None = None
    label_flip_rate: float | None = None
    flip_seed: int | None = None
    seed: int | None = None
    max_steps: int | None = None
    validate: bool = True
    one_model_in_memory: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def layers(self) -> list[str | Path]:
        return [self.recipe] if isinstance(self.recipe, (str, Path)) else list(self.recipe)

    def settings(self) -> dict[str, Any]:
        """The run as dotted keys, the form LightningCLI takes."""
        typed = {
            "seed_everything": self.seed, "model.model": self.model, "data.train_file": self.train_file,
            "data.val_file": self.val_file, "data.label_flip_rate": self.label_flip_rate, "data.seed": self.flip_seed,
            "trainer.max_steps": self.max_steps, "trainer.default_root_dir": self.run_dir,
        }
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in typed.items() if v is not None}
        if self.data is not None:  # all of it: a chat template of None overrides a recipe's too
            settings.update(self.data.fit_overrides())
        if not self.validate:
            settings["trainer.limit_val_batches"] = 0
        settings.update(self.overrides)
        if self.one_model_in_memory and issubclass(recipe_objective(self.layers()[0]), ReferenceModule):
            settings["model.precompute_reference"] = True
        return settings


def _option(key: str, value: Any) -> str:
    """``--key=value`` as LightningCLI parses it: strings as they are, anything else as JSON (valid YAML)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def run_fit(
    run: RunSpec | str | Path | Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    *,
    run_dir: str | Path | None = None,
) -> FitResult:
    """Train a run in this process and return what it produced.

    Args:
        run: A :class:`RunSpec`; or, for a quick run, a recipe name (``drdo``), a YAML path, or
            several of them layered in order (``["drdo", "ablations/gamma0"]``).
        overrides: Dotted keys merged over the run, e.g. ``{"model.model": "path",
            "data.max_length": 256, "trainer.max_steps": 50}``.
        run_dir: The run folder (``trainer.default_root_dir``): logs, checkpoints and the export go
            under it. Default: the run's, else the recipe's.
    """
    if not isinstance(run, RunSpec):
        run = RunSpec(tuple(run) if isinstance(run, (list, tuple)) else run)
    settings = {**run.settings(), **(overrides or {})}
    if run_dir is not None:
        settings["trainer.default_root_dir"] = str(run_dir)
    argv = ["fit", *(arg for c in run.layers() for arg in ("--config", str(c)))]
    cli = lightning_cli(argv + [_option(k, v) for k, v in settings.items()])
    return fit_result(cli.trainer)


def fit_result(trainer) -> FitResult:
    """A :class:`FitResult` from a trainer that has finished ``fit``."""
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ExportHuggingFace)]
    exports = [cb.directory(trainer) for cb in callbacks]
    checkpoint = trainer.checkpoint_callback
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for cb in callbacks:
        if cb.selected is not None:  # what the export holds: the best checkpoint's score, not the last validation's
            metrics[f"selected/{cb.selected['monitor']}"] = cb.selected["score"]
            if cb.selected["step"] is not None:
                metrics["selected/step"] = float(cb.selected["step"])
    return FitResult(
        run_dir=Path(trainer.default_root_dir),
        export_dir=exports[-1] if exports else None,
        checkpoint_dir=Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else None,
        log_dir=Path(trainer.log_dir) if trainer.logger is not None else None,
        global_step=trainer.global_step,
        metrics=metrics,
    )
