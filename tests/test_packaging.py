"""The package as users install it: a wheel in a fresh virtual environment, run from an empty folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import progress
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd: Path, env: dict | None = None) -> str:
    return finished(*args, cwd=cwd, env=env).stdout


def finished(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command that must exit with status 0."""
    done = progress.run(args, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_wheel_carries_the_recipes_and_runs_from_an_empty_folder(tmp_path, tiny_model_dir, pairs16):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    for folder in ("drdo_lightning", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source,
        cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("drdo_lightning-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    # The dependencies (torch, lightning, ...) come from this environment, behind the venv's own packages.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run(python, "-c", "import drdo_lightning.recipes as r; print(r.__file__); print(r.recipes_dir())", cwd=empty, env=env)
    assert where.splitlines() == [str(site / "drdo_lightning" / "recipes.py"), str(site / "drdo_lightning" / "configs")]

    listed = run(venv / "bin" / "drdo-lightning", "--help", cwd=empty, env=env)
    assert all(f"  {name} " in listed for name in ("fit", "evaluate", "paper-pipeline", "build-embedded-default"))
    printed = run(python, "-m", "drdo_lightning", "fit", "--config", "drdo", "--print_config", cwd=empty, env=env)
    assert "class_path: drdo_lightning.DRDO" in printed and "every_n_train_steps: 50" in printed
    assert "--policies" in run(python, "-m", "drdo_lightning", "evaluate", "--help", cwd=empty, env=env)

    # Every YAML of configs/, each folder's too, parses from the wheel by its shipped name.
    names = sorted(str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").rglob("*.yaml"))
    parsed = run(python, "-c", PARSE_EACH, *names, cwd=empty, env=env).splitlines()
    assert parsed == [f"{name} parses" for name in names]
    assert list(empty.iterdir()) == []

    # The installed command trains, scores and exports with exit status 0, and prints no object or traceback.
    command = venv / "bin" / "drdo-lightning"
    steps = [
        ["fit", "--config", "drdo", "--model.model", tiny_model_dir, "--data.train_file", pairs16, "--data.val_file",
         pairs16, "--data.batch_size", "8", "--trainer.max_steps", "2", "--trainer.default_root_dir", "run",
         "--trainer.enable_progress_bar", "false"],
        ["score", "--models", "[run/export]", "--data", pairs16, "--output", "scored.jsonl"],
        ["export", "--checkpoint", "run/checkpoints/last.ckpt", "--output", "exported"],
    ]
    for step in steps:
        stderr = finished(command, *step, cwd=empty, env={**env, "OMP_NUM_THREADS": "1"}).stderr
        assert "Traceback" not in stderr and "<drdo_lightning" not in stderr, (step[0], stderr[-2000:])
    assert (empty / "scored.jsonl").is_file() and (empty / "exported" / "config.json").is_file()


# Runs in the wheel's environment: `--print_config` of each named config as a user runs it (a layer
# in a folder on the DRDO recipe, a function command's config with its command, a configuration of the
# experiment engine with protocol, an overlay of the frontier's run over it, a recipe with fit).
PARSE_EACH = """
import contextlib, io, sys
from drdo_lightning.cli import COMMANDS, main
from drdo_lightning.recipes import read_config
for name in sys.argv[1:]:
    if "/" in name:
        argv = ["fit", "--config", "drdo", "--config", name]
    elif "conditions" in read_config(name):
        argv = ["protocol", "--config", name]
    elif "frontier" in read_config(name):  # an overlay of the frontier's run
        argv = ["protocol", "--config", "frontier", "--config", name]
    else:
        argv = [name if name in COMMANDS else "fit", "--config", name]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        main([*argv, "--print_config"])
    print(name, "parses" if printed.getvalue().strip() else "printed nothing")
"""
