"""Errors a user fixes, and the checks that raise them before a library would fail less clearly.

The command line prints a :class:`UserError` as one line, without a traceback, and exits with
status 2 (see :mod:`drdo_lightning.cli`); in a script it is an ordinary exception.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem in what the user gave: a missing path, bad data, a wrong option."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the source, the row and the field.

    ``setting`` names the data setting that would fix it (``chat_template``, ``on_bad_row``) and
    ``advice`` says how, with ``{option}`` standing for that setting as the running command spells
    it (``--data.chat_template`` in ``fit``, ``--chat_template`` in ``score``).
    """

    def __init__(self, message: str, *, setting: str | None = None, advice: str | None = None) -> None:
        super().__init__(message)
        self.message, self.setting, self.advice = message, setting, advice

    def for_option(self, option: str | None) -> str:
        """The message with the advice naming ``option`` (none when the command has no such option)."""
        if self.advice is None or option is None:
            return self.message
        return f"{self.message} ({self.advice.format(option=option)})"

    def __str__(self) -> str:
        return self.for_option(self.setting)


class SettingError(UserError, ValueError):
    """A setting out of its range or in conflict with another; the message names them."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the run needs does not exist; the message says what would create it (``made_by``).

    ``path`` is kept apart so that a caller can tell which path is missing.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, made_by: str | None = None) -> None:
        super().__init__(message if made_by is None else f"{message}: {made_by}")
        self.message, self.path, self.made_by = message, path, made_by


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` or ``name``: what the Hugging Face hub accepts as a repository id."""
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and not name.endswith((".json", ".yaml"))


def require_pretrained(name_or_path: str | Path, what: str, creator: str | None = None) -> None:
    """Raise :class:`MissingPathError` unless ``name_or_path`` is a local directory or can be a hub id.

    A name whose first folder exists here (``runs/drdo/export``, ``data/oracle``), or lies in a
    registered shipped folder (:func:`register_shipped_folder`), is taken for a local path even when
    it has the form of a hub id, so a model that was never trained or built is reported as missing
    instead of looked up on the hub. ``creator`` says what creates it (default: :func:`made_by`).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    text = str(name_or_path)
    local = len(path.parts) > 1 and (Path(path.parts[0]).is_dir() or shipped_made_by(path) is not None)
    if _looks_like_hub_id(text) and not local:
        return
    raise MissingPathError(f"{what} {text} does not exist", path=text, made_by=creator or made_by(text))


EXPORT_MADE_BY = (
    "train it with `python -m drdo_lightning fit --config RECIPE` (the run's export/ folder) "
    "or write one from a checkpoint with `python -m drdo_lightning export`"
)
REWARD_MODEL_MADE_BY = "train one with `python -m drdo_lightning fit --config oracle` (or `train-ensemble`)"


# Top folder -> what builds it, for folders that a package on top of the library ships or builds.
SHIPPED_FOLDERS: dict[str, str] = {}


def register_shipped_folder(folder: str, made_by: str) -> None:
    """Name what builds ``folder`` (relative to the working directory), for the errors about paths in it."""
    SHIPPED_FOLDERS[folder] = made_by


def shipped_made_by(path: str | Path) -> str | None:
    """What builds the registered folder ``path`` lies in, or None."""
    parts = Path(path).parts
    return SHIPPED_FOLDERS.get(parts[0]) if parts else None


def made_by(path: str | Path) -> str:
    """What creates ``path``: the builder of a registered shipped folder; for a recipe's own run
    folder (``runs/drdo/export``) that recipe's ``fit``; training or ``export`` otherwise."""
    if (builder := shipped_made_by(path)) is not None:
        return builder
    parts = Path(path).parts
    if len(parts) == 3 and parts[0] == "runs" and parts[2] == "export":
        return f"train it with `python -m drdo_lightning fit --config {parts[1]}`"
    return EXPORT_MADE_BY
