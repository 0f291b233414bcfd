"""The quick-start notebook stands alone: it finds the repository root from where it is opened (and
outside a checkout stops at once, saying what to do), takes a plain pairs file through loading,
Oracle scoring, DRDO and DPO training, loading the export and evaluation, and is saved with its
outputs, which name no path of the machine that ran it.

Refresh the saved outputs after changing the notebook (about a minute on 2 CPU cores):

    OMP_NUM_THREADS=1 python tests/test_notebook.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
OUT = ROOT / "runs" / "notebook"  # what the notebook writes, relative to the repository root
# Absolute paths as they show up in tracebacks, warnings and logs, on POSIX machines and Windows.
ABSOLUTE = re.compile(r"(?<![\w.~/-])/(?:work|tmp|home|Users|root|var|opt|usr|private|mnt|srv)/|\b[A-Za-z]:\\|site-packages")


def execute(nb, cwd: Path, timeout: int):
    """Run ``nb`` in a fresh kernel whose working directory is ``cwd``, as Jupyter opened there would
    (no timestamps in the cells' metadata: the saved notebook changes only where its outputs do)."""
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def printed(nb) -> str:
    return "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream" and o.get("name") == "stdout")


def output_texts(nb) -> list[str]:
    """Every text an output shows (streams, errors, text and HTML data), images left out."""
    texts = []
    for o in outputs(nb):
        texts.append(o.get("text", ""))
        texts += [o.get("evalue", ""), *o.get("traceback", [])]
        texts += [v if isinstance(v, str) else json.dumps(v) for k, v in o.get("data", {}).items() if not k.startswith("image/")]
    return texts


def machine_paths(nb) -> list[str]:
    """Output lines naming a path of this machine (its checkout, home or temp folder) or any absolute path."""
    own = {str(ROOT), str(Path.home()), tempfile.gettempdir()}
    return [line for text in output_texts(nb) for line in text.splitlines()
            if ABSOLUTE.search(line) or any(path in line for path in own if len(path) > 1)]


def check_results(nb) -> None:
    """What a reader relies on: no errors, the four plots, both students against the SFT policy under both judges."""
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    images = [o for o in outputs(nb) if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 4  # win rates under two judges, reward vs temperature, training curves
    text = printed(nb)
    for judge in ("oracle", "gold"):
        for policy in ("drdo", "dpo"):
            assert re.search(rf"{judge} judge: {policy} beats sft \d+% \[\d+%, \d+%\]", text), (judge, policy)
    assert "oracle_chosen" in text and "oracle_rejected" in text  # the scored file's columns, printed
    assert "DRDO reward margin" in text


@pytest.mark.slow
def test_quickstart_notebook_executes():
    nb = execute(nbformat.read(NOTEBOOK, as_version=4), NOTEBOOK.parent, timeout=600)
    check_results(nb)
    with open(OUT / "my_pairs.jsonl") as f:
        pairs = [json.loads(line) for line in f]
    with open(OUT / "my_pairs.scored.jsonl") as f:
        scored = [json.loads(line) for line in f]
    assert len(pairs) == len(scored) == 200
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}  # the user's file: plain pairs, left as it was
    assert set(scored[0]) == {"prompt", "chosen", "rejected", "oracle_chosen", "oracle_rejected"}
    assert all(isinstance(r["oracle_chosen"], float) and isinstance(r["oracle_rejected"], float) for r in scored)
    for run in ("drdo", "dpo"):
        assert (OUT / run / "export" / "config.json").is_file()
    assert (OUT / "evaluation" / "report.md").is_file()
    assert not machine_paths(nb)


def test_first_cell_outside_a_checkout_stops_with_what_to_do(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [next(c for c in nb.cells if c.cell_type == "code")]
    for cell in nb.cells:
        cell.outputs = []
    with pytest.raises(CellExecutionError):  # a loop up past / would end in the client's timeout instead
        execute(nb, tmp_path, timeout=600)
    (error,) = [o for o in outputs(nb) if o.output_type == "error"]
    assert error.ename == "SystemExit"
    assert "No embedded_default/ folder" in error.evalue
    assert "clone" in error.evalue and "python -m drdo_lightning build-embedded-default" in error.evalue
    assert not [o for o in outputs(nb) if o.output_type == "stream"]  # the message alone


def test_saved_notebook_shows_its_outputs_and_no_machine_paths():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # saved after one run, top to bottom
    check_results(nb)
    assert not machine_paths(nb)


def save() -> None:
    """Execute the notebook from its folder and write it back with its outputs."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    started = time.monotonic()
    execute(nb, NOTEBOOK.parent, timeout=600)
    print(f"executed in {time.monotonic() - started:.0f} s")
    check_results(nb)
    leaked = machine_paths(nb)
    if leaked:
        sys.exit("not saved: outputs name paths of this machine:\n" + "\n".join(leaked))
    nbformat.write(nb, NOTEBOOK)
    print(f"saved {NOTEBOOK.relative_to(ROOT)} with its outputs")


if __name__ == "__main__":
    save()
