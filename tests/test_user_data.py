"""A user with their own data, outside the checkout: the installed command run from an empty folder
on the layouts people bring, every notice on the first run and no error that sends them to the
embedded default they did not ask for."""

from __future__ import annotations

import csv
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import progress
import pytest
import yaml
from data_support import TEMPLATE, as_tuples, setup_dm
from transformers import AutoTokenizer

from drdo_lightning import CausalLMWithRewardHead
from drdo_lightning.cli import main
from drdo_lightning.data.datamodule import PreferenceDataModule
from drdo_lightning.data.tokenization import load_tokenizer
from drdo_lightning.errors import DataError, SettingError
from drdo_lightning.evaluating import evaluate
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.scoring import score

ROOT = Path(__file__).resolve().parents[1]
SHORT_FIT = ("--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--data.batch_size", "4")


def drdo(*args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m drdo_lightning ARGS`` in a fresh process in ``cwd``, this checkout's package on its path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return progress.run([sys.executable, "-m", "drdo_lightning", *args], cwd=cwd, env=env)


def succeeded(done: subprocess.CompletedProcess) -> str:
    """The stderr of a command that must exit with status 0."""
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def failed(done: subprocess.CompletedProcess) -> str:
    """The one line a command failing on a user error prints (exit status 2, no traceback)."""
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


@pytest.fixture()
def empty(tmp_path) -> Path:
    """An empty working folder, away from the checkout (no configs/, no embedded_default/)."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def scored_rows(tiny_task) -> list[dict]:
    """20 pairs with Oracle scores (the gold reward stands in), as a user's scored file holds them."""
    return [dict(r) for r in tiny_task["train"][:20]]


@pytest.mark.slow
def test_the_first_run_of_a_messy_file_prints_its_counts(empty, tiny_model_dir, scored_rows):
    """The run that builds the cache says what loading skipped and truncated, as a cached run does."""
    rows = [dict(r) for r in scored_rows]
    rows[3]["rejected"] = rows[3]["chosen"]
    write_jsonl(empty / "mine.jsonl", rows)
    args = ("fit", "--config", "drdo", "--model.model", tiny_model_dir, "--data.train_file", "mine.jsonl",
            "--data.val_file", "null", "--data.on_bad_row", "skip", "--data.max_prompt_length", "4",
            "--data.cache_dir", "cache", *SHORT_FIT)
    first = succeeded(drdo(*args, cwd=empty))
    assert "mine.jsonl: skipped 1 bad rows (on_bad_row skip), by reason: {'identical_responses': 1}" in first
    assert "train split: 19 of 19 prompts truncated to max_prompt_length 4" in first
    assert "(tokenized data from the cache)" not in first
    second = succeeded(drdo(*args, cwd=empty))
    assert "skipped 1 bad rows (on_bad_row skip), by reason: {'identical_responses': 1} (tokenized data from the cache)" in second


@pytest.mark.slow
def test_own_training_data_sets_the_recipes_embedded_validation_file_aside(empty, tiny_model_dir, scored_rows):
    """A recipe's validation file is the embedded default's: with the user's own training file it gives
    way, with a notice, to a seeded tenth of that file, and the run validates on it."""
    write_jsonl(empty / "mine.jsonl", scored_rows)
    stderr = succeeded(drdo("fit", "--config", "drdo", "--model.model", tiny_model_dir, "--data.train_file", "mine.jsonl",
                            "--data.cache_dir", "null", "--trainer.val_check_interval", "1", *SHORT_FIT, cwd=empty))
    assert ("val_file embedded_default/data/val.jsonl is the recipe's default, the embedded default's validation data, "
            "and train_file mine.jsonl is your own: validating on 0.1 of train_file (val_fraction, seeded) instead") in stderr
    (metrics,) = (empty / "runs" / "drdo" / "logs").glob("version_*/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert "val/loss" in header


def test_own_data_without_a_model_names_the_option_not_the_build(empty, tiny_model_dir, scored_rows):
    write_jsonl(empty / "mine.jsonl", scored_rows)
    line = failed(drdo("fit", "--config", "drdo", "--data.train_file", "mine.jsonl", cwd=empty))
    assert line.startswith("error: train_file mine.jsonl is your own data, but the model is the recipe's default")
    assert line.endswith("name your starting policy with --model.model (a model directory or hub id; its tokenizer "
                         "comes with it)")


def test_evaluate_outside_the_checkout_names_judges_and_prompts_to_pass(empty, tiny_model_dir):
    policies = ("--policies", json.dumps({"sft": str(tiny_model_dir)}))
    line = failed(drdo("evaluate", *policies, cwd=empty))
    assert "embedded_default/" not in line and "name your judges with --judges '{NAME: reward-model directory}'" in line
    line = failed(drdo("evaluate", *policies, "--judges", json.dumps({"own": str(tiny_model_dir)}), cwd=empty))
    assert "embedded_default/" not in line and "name your evaluation prompts with --prompts FILE" in line


def with_scores_column(rows: list[dict]) -> list[dict]:
    """``rows`` with their Oracle scores in one list-valued column, ``scores: [chosen, rejected]``, as exported data has them."""
    return [{"scores": [r.pop("oracle_chosen"), r.pop("oracle_rejected")], **r} for r in map(dict, rows)]


@pytest.mark.slow
def test_a_scores_column_of_chosen_and_rejected_trains(empty, tiny_model_dir, scored_rows):
    """One column holding [chosen, rejected], named as both score columns, is read as the two scores."""
    write_jsonl(empty / "mine.jsonl", with_scores_column(scored_rows))
    succeeded(drdo("fit", "--config", "drdo", "--model.model", tiny_model_dir, "--data.train_file", "mine.jsonl",
                   "--data.chosen_score_column", "scores", "--data.rejected_score_column", "scores",
                   "--data.cache_dir", "null", *SHORT_FIT, cwd=empty))


def test_score_columns_are_read_and_shape_checked_when_the_data_loads(tmp_path, tiny_model_dir, scored_rows):
    rows = with_scores_column(scored_rows)
    dm = setup_dm(write_jsonl(tmp_path / "mine.jsonl", rows), tiny_model_dir, chosen_score_column="scores",
                  rejected_score_column="scores")
    assert [(ex["chosen_score"], ex["rejected_score"]) for ex in dm.train_dataset] == [tuple(r["scores"]) for r in rows]
    ensemble = [{**r, "c": [1.0, 2.0], "r": [0.5, 0.1]} for r in rows]
    ensemble[4]["r"] = 0.3
    with pytest.raises(DataError, match=r"row 5: field 'r': one number, where 'c' holds a list of 2 numbers: every "
                                        r"response needs a score of one shape"):
        setup_dm(write_jsonl(tmp_path / "ensemble.jsonl", ensemble), tiny_model_dir, chosen_score_column="c",
                 rejected_score_column="r")
    ensemble[4]["r"], ensemble[6]["c"], ensemble[6]["r"] = [0.5, 0.1], 1.0, 0.0
    with pytest.raises(DataError, match=r"row 7: field 'c': one number, where the first row's holds a list of 2"):
        setup_dm(write_jsonl(tmp_path / "ensemble.jsonl", ensemble), tiny_model_dir, chosen_score_column="c",
                 rejected_score_column="r")


def chat_rows(rows: list[dict]) -> list[dict]:
    """A chat prompt (a system message, then the user's) with the answers as plain strings."""
    return [{"prompt": [{"role": "system", "content": "Finish the review."}, {"role": "user", "content": r["prompt"]}],
             "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def test_a_chat_prompt_with_text_answers_reads_as_the_assistants_turn(tmp_path, tiny_model_dir, scored_rows):
    """The same token ids as the TRL conversational layout, each answer one assistant message."""
    rows = chat_rows(scored_rows)
    conversational = [{**r, "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    loaded = [setup_dm(write_jsonl(tmp_path / f"{name}.jsonl", data), tiny_model_dir, chat_template=TEMPLATE).train_dataset
              for name, data in (("text", rows), ("messages", conversational))]
    assert as_tuples(loaded[0]) == as_tuples(loaded[1]) and len(loaded[0]) == len(rows)
    assert "<|system|>Finish the review." in AutoTokenizer.from_pretrained(tiny_model_dir).decode(loaded[0][0]["prompt_ids"])


@pytest.mark.slow
def test_a_chat_prompt_with_text_answers_trains_from_the_command_line(empty, tiny_model_dir, scored_rows):
    write_jsonl(empty / "chat.jsonl", chat_rows(scored_rows))
    (empty / "template.jinja").write_text(TEMPLATE)
    succeeded(drdo("fit", "--config", "dpo", "--model.model", tiny_model_dir, "--data.train_file", "chat.jsonl",
                   "--data.chat_template", "template.jinja", "--data.cache_dir", "null", *SHORT_FIT, cwd=empty))


def messy_lines(rows: list[dict]) -> str:
    """JSON Lines of ``rows`` with three bad ones: a malformed line, identical responses, an empty prompt."""
    rows = [dict(r) for r in rows]
    rows[2]["rejected"] = rows[2]["chosen"]
    rows[5]["prompt"] = ""
    lines = [json.dumps(r) for r in rows]
    lines[8] = lines[8][:-5]  # cut short, as a copy interrupted mid-line leaves it
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    path = tmp_path_factory.mktemp("reward") / "oracle"
    CausalLMWithRewardHead.from_pretrained(tiny_model_dir).save_pretrained(path, tokenizer=load_tokenizer(str(tiny_model_dir)))
    return path


def test_an_error_names_the_first_bad_row_and_counts_them_all(tmp_path, tiny_model_dir, scored_rows):
    (tmp_path / "messy.jsonl").write_text(messy_lines(scored_rows))
    with pytest.raises(DataError) as error:
        setup_dm(tmp_path / "messy.jsonl", tiny_model_dir)
    assert str(error.value) == (
        f"{tmp_path / 'messy.jsonl'}: row 3: field 'rejected': chosen and rejected responses are identical (3 of 20 rows "
        "are bad, by reason: {'identical_responses': 1, 'empty_field': 1, 'malformed_json': 1}) (on_bad_row skip skips "
        "such rows)")


@pytest.mark.slow
def test_skip_skips_every_bad_row_in_score_and_fit(empty, tiny_model_dir, reward_model, scored_rows):
    """A malformed line is skipped like any bad row, and `score` skips too, leaving them out of its output."""
    (empty / "messy.jsonl").write_text(messy_lines(scored_rows))
    counts = "skipped 3 bad rows (on_bad_row skip), by reason: {'identical_responses': 1, 'empty_field': 1, 'malformed_json': 1}"
    stderr = succeeded(drdo("score", "--models", f"[{reward_model}]", "--data", "messy.jsonl", "--output", "scored.jsonl",
                            "--on_bad_row", "skip", cwd=empty))
    assert f"messy.jsonl: {counts}" in stderr
    scored = [json.loads(line) for line in (empty / "scored.jsonl").read_text().splitlines()]
    kept = [r for i, r in enumerate(scored_rows) if i not in (2, 5, 8)]
    assert [r["prompt"] for r in scored] == [r["prompt"] for r in kept]
    assert all(isinstance(r["oracle_chosen"], float) and isinstance(r["oracle_rejected"], float) for r in scored)
    stderr = succeeded(drdo("fit", "--config", "dpo", "--model.model", tiny_model_dir, "--data.train_file", "messy.jsonl",
                            "--data.on_bad_row", "skip", "--data.cache_dir", "null", *SHORT_FIT, cwd=empty))
    assert f"messy.jsonl: {counts}" in stderr


def hub_folder(root: Path, rows: list[dict], splits: dict[str, slice]) -> Path:
    """A folder as a hub download lays it out: ``data/<split>-00000-of-00001.jsonl``."""
    for name, part in splits.items():
        write_jsonl(root / "data" / f"{name}-00000-of-00001.jsonl", rows[part])
    return root


def test_a_folders_held_out_split_validates(tmp_path, tiny_model_dir, scored_rows, caplog):
    folder = hub_folder(tmp_path / "download", scored_rows, {"train": slice(0, 12), "test": slice(12, 16),
                                                             "validation": slice(16, 20)})
    dm = setup_dm(folder, tiny_model_dir)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (12, 4)
    assert f"train_file {folder} has a 'validation' split and no val_file or val_fraction was given: validating on it" in caplog.text
    assert [ex["prompt_ids"] for ex in setup_dm(folder, tiny_model_dir, val_split="test").val_dataset] == [
        ex["prompt_ids"] for ex in setup_dm(folder / "data" / "test-00000-of-00001.jsonl", tiny_model_dir).train_dataset]
    with pytest.raises(SettingError, match=r"val_split 'dev' names a split of val_file or of a train_file folder, but the "
                                           r"folder train_file .* has splits \['test', 'train', 'validation'\]: give --data.val_file"):
        setup_dm(folder, tiny_model_dir, val_split="dev")
    with pytest.raises(SettingError, match=r"val_split 'test' names .* but train_file .*mine.jsonl has none"):
        setup_dm(write_jsonl(tmp_path / "mine.jsonl", scored_rows), tiny_model_dir, val_split="test")


@pytest.mark.slow
def test_a_hub_download_with_only_a_test_split_validates_on_it(empty, tiny_model_dir, scored_rows):
    hub_folder(empty / "download", scored_rows, {"train": slice(0, 16), "test": slice(16, 20)})
    stderr = succeeded(drdo("fit", "--config", "dpo", "--model.model", tiny_model_dir, "--data.train_file", "download",
                            "--data.cache_dir", "null", "--trainer.val_check_interval", "1", *SHORT_FIT, cwd=empty))
    assert "val_file embedded_default/data/val.jsonl is the recipe's default" in stderr
    assert "your own: validating on train_file's 'test' split instead" in stderr
    (metrics,) = (empty / "runs" / "dpo" / "logs").glob("version_*/metrics.csv")
    assert "val/loss" in metrics.read_text().splitlines()[0].split(",")


def test_the_data_layer_budgets_agree_with_score_evaluate_and_the_data_module():
    """`data/chat` (for your own data) and the commands that read pairs outside training share one budget."""
    layer = yaml.safe_load((ROOT / "configs" / "data" / "chat.yaml").read_text())["data"]
    for fn in (score, evaluate, PreferenceDataModule):
        parameters = inspect.signature(fn).parameters
        assert {k: parameters[k].default for k in ("max_prompt_length", "max_length")} == {
            k: layer[k] for k in ("max_prompt_length", "max_length")}, fn


@pytest.mark.slow
def test_the_data_layer_keeps_ordinary_chat_prompts_whole(empty, tiny_model_dir, scored_rows):
    """Prompts of about 100 tokens lose their beginning to the recipe's budget, and keep it under `data/chat`."""
    rows = [{**r, "prompt": " ".join([r["prompt"]] * 8)} for r in scored_rows]
    write_jsonl(empty / "long.jsonl", rows)
    args = ("fit", "--config", "drdo", "--model.model", tiny_model_dir, "--data.train_file", "long.jsonl",
            "--data.cache_dir", "null", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false")
    assert "prompts truncated to max_prompt_length 64" in succeeded(drdo(*args, cwd=empty))
    stderr = succeeded(drdo(*args, "--config", "data/chat", cwd=empty))
    assert "truncated" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(("argv", "hint"), [
    (["fit", "--config", "drod"], "no such file, nor a shipped recipe; did you mean drdo? (recipes: "),
    (["fit", "--config", "drdo", "--model.alpa", "1"], "error: unknown option --model.alpa; did you mean --model.alpha?"),
    (["fit", "--config", "drdo", "--data.batchsize", "4"], "error: unknown option --data.batchsize; did you mean --data.batch_size?"),
    (["score", "--modles", "[m]"], "error: unknown option --modles; did you mean --models?"),
])
def test_a_misspelt_option_or_recipe_gets_a_did_you_mean(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and hint in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_first_cpu_run_says_what_matters_and_exports_for_generation(empty, tiny_model_dir, scored_rows):
    """No DeepSpeed notice on a run without DeepSpeed; a batch larger than the data is told; the
    export pads on the left and generates in batches through CausalLMWithRewardHead."""
    write_jsonl(empty / "mine.jsonl", scored_rows)
    done = drdo("fit", "--config", "drdo", "--model.model", tiny_model_dir, "--data.train_file", "mine.jsonl",
                "--data.cache_dir", "null", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
                "--data.batch_size", "64", cwd=empty)
    stderr = succeeded(done)
    assert "Setting accelerator to CPU" not in done.stdout + stderr
    assert "batch_size 64 is more than the 18 training pairs: every step trains on all of them" in stderr
    export = empty / "runs" / "drdo" / "export"
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.padding_side == "left"
    model = CausalLMWithRewardHead.from_pretrained(export)
    prompts = [scored_rows[0]["prompt"], scored_rows[1]["prompt"] + " and then some more words"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1]:]
    alone = [model.generate(**tokenizer([p], return_tensors="pt"), **settings)[0, -4:] for p in prompts]
    assert [row.tolist() for row in together] == [row.tolist() for row in alone]


def test_evaluate_says_when_policies_answer_alike(tmp_path, tiny_model_dir, reward_model, scored_rows, caplog):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in scored_rows[:3]])
    evaluate({"sft": str(tiny_model_dir), "dpo": str(tiny_model_dir)}, {"oracle": str(reward_model)}, str(prompts),
             out=str(tmp_path / "eval"), temperatures=[0.0], max_new_tokens=4, bootstrap_samples=10, kl_reference=None)
    assert ("policies 'sft' and 'dpo' gave the same response in all 3 generations (every prompt and temperature): every "
            "comparison between them is a tie") in caplog.text


def readme_commands(heading: str) -> list[str]:
    """The installed command's lines of the README section ``heading``'s block, in order, with ``$MODEL`` as written."""
    section = (ROOT / "README.md").read_text().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("drdo-lightning ")]


@pytest.mark.slow
def test_the_readme_own_data_path_runs_from_an_empty_folder(empty, tiny_model_dir, tiny_task):
    """README's block as written, shortened: the tiny model for $MODEL, a few steps, few prompts."""
    write_jsonl(empty / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in tiny_task["train"][:40]])
    write_jsonl(empty / "held_out.jsonl", [{"prompt": r["prompt"]} for r in tiny_task["val"][:4]])
    shorter = {"fit": ["--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.enable_progress_bar",
                       "false", "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "1"],
               "score": [], "evaluate": ["--temperatures", "[0.7]", "--max_new_tokens", "4", "--bootstrap_samples", "20"]}
    commands = readme_commands("Your own data")
    assert [shlex.split(c)[1] for c in commands] == ["fit", "score", "fit", "evaluate"]
    for command in commands:
        args = shlex.split(command.replace("$MODEL", str(tiny_model_dir)))[1:]
        succeeded(drdo(*args, *shorter[args[0]], cwd=empty))
    assert (empty / "scored.jsonl").is_file() and (empty / "runs" / "drdo" / "export" / "config.json").is_file()
    results = json.loads((empty / "runs" / "evaluate" / "results.json").read_text())
    assert {r["policy"] for r in results if "policy" in r} >= {"sft", "drdo"}


@pytest.mark.slow
def test_the_readme_online_block_runs_from_an_empty_folder_with_a_prompt_file_and_an_oracle(
        empty, tiny_model_dir, reward_model, tiny_task):
    """README's online block as written, shortened: a file of prompts alone, an Oracle where the block says."""
    write_jsonl(empty / "prompts.jsonl", [{"prompt": r["prompt"]} for r in tiny_task["train"][:24]])
    shutil.copytree(reward_model, empty / "runs" / "oracle" / "export")
    [command] = readme_commands("Online: the student's own samples")
    args = shlex.split(command.replace("$MODEL", str(tiny_model_dir)))[1:]
    succeeded(drdo(*args, "--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches",
                   "1", "--trainer.enable_progress_bar", "false", "--data.batch_size", "4",
                   "--trainer.accumulate_grad_batches", "1", "--trainer.log_every_n_steps", "1",
                   "--model.online.max_new_tokens", "8", cwd=empty))
    run = empty / "runs" / "online_drdo"
    assert (run / "export" / "config.json").is_file()
    with next(run.rglob("metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    pairs = [float(r["train/online/pairs"]) for r in rows if r.get("train/online/pairs")]
    assert len(pairs) == 2 and all(0 < n <= 4 for n in pairs)  # at most one pair per prompt, 4 prompts a step
