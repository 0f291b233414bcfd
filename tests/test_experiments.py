"""Experiments: intervals over seeds, the edit-distance splits on hand-made data, the ablation
configs, the tuning rule, and the engine's robustness and comparison configurations end to end at a
tiny size."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from drdo_lightning import stages
from drdo_lightning.cli import main
from drdo_lightning.data.splits import edit_distance, normalized_edit_distance
from drdo_lightning.experiments import ablations, conditions, sweeps, tuning
from drdo_lightning.experiments.sweeps import seed_interval
from drdo_lightning.jsonl import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_seed_interval_is_the_student_t_interval():
    est = seed_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t_{0.975, 2} = 4.303
    assert est.value == 2.0
    assert est.high - est.value == pytest.approx(4.303 / math.sqrt(3), abs=1e-6)
    assert est.value - est.low == pytest.approx(est.high - est.value)
    for n, t_975 in ((12, 2.2010), (31, 2.0423)):  # beyond the table: the expansion
        values = [float(v) for v in range(n)]
        half = seed_interval(values).high - statistics.fmean(values)
        assert half * math.sqrt(n) / statistics.stdev(values) == pytest.approx(t_975, abs=1e-3)
    one = seed_interval([0.4])
    assert one.value == 0.4 and math.isnan(one.low) and math.isnan(one.high)


def test_edit_distance_on_known_cases():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance("a b c d".split(), "a x c".split()) == 2  # one substitution, one deletion
    assert normalized_edit_distance("a b c".split(), "a x c".split()) == pytest.approx(1 / 3)
    assert normalized_edit_distance([], []) == 0.0
    assert normalized_edit_distance(["a"], ["b"]) == 1.0


# (confidence, number of the 10 words that differ): distances 0.9 0.8 0.2 0.5 0.1 0.6 0.3, median
# 0.5; confidence median 4. High on both: the first two rows; low on both: confidence 3 and 1.
HAND_MADE = [(7, 9), (6, 8), (5, 2), (4, 5), (3, 1), (2, 6), (1, 3)]
WORDS = [f"w{i}" for i in range(10)]


def _texts(k: int) -> tuple[str, str]:
    return " ".join(WORDS), " ".join(WORDS[: 10 - k] + [f"x{i}" for i in range(k)])


def _check_split_report(out: Path, report: dict) -> None:
    assert report["all"]["size"] == 7 and report["hc_he"]["size"] == 2 and report["lc_le"]["size"] == 2
    assert report["all"]["mean_confidence"] == pytest.approx(4.0)
    assert report["all"]["mean_edit_distance"] == pytest.approx(3.4 / 7)
    assert report["hc_he"]["mean_confidence"] == pytest.approx(6.5)
    assert report["hc_he"]["mean_edit_distance"] == pytest.approx(0.85)
    assert report["lc_le"]["mean_confidence"] == pytest.approx(2.0)
    assert report["lc_le"]["mean_edit_distance"] == pytest.approx(0.2)
    medians = json.loads((out / "splits.json").read_text())["medians"]
    assert medians == {"confidence": 4.0, "edit_distance": pytest.approx(0.5)}
    easy = [json.loads(line) for line in (out / "hc_he.jsonl").read_text().splitlines()]
    assert sorted(r["confidence"] for r in easy) == [6.0, 7.0]
    assert {"prompt", "chosen", "rejected", "confidence", "edit_distance"} <= set(easy[0])


def test_splits_on_pairs_with_a_confidence_column(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"post {i}", "chosen": _texts(k)[0], "rejected": _texts(k)[1], "conf": c}
            for i, (c, k) in enumerate(HAND_MADE)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = main(["splits", "--data", str(data), "--out", str(tmp_path / "out"), "--confidence_column", "conf"])
    _check_split_report(tmp_path / "out", report)
    assert "| hc_he | 2 | 6.500 | 0.850 |" in (tmp_path / "out" / "splits.md").read_text()


def test_splits_on_the_openai_tldr_comparisons_format(tmp_path):
    data = tmp_path / "comparisons.jsonl"
    rows = []
    for i, (c, k) in enumerate(HAND_MADE):
        better, worse = _texts(k)
        choice = i % 2  # the preferred summary sits at either index
        summaries = [{"text": worse, "policy": "p"}, {"text": better, "policy": "q"}][:: 1 if choice else -1]
        rows.append({"info": {"id": str(i), "post": f"post {i}", "title": "t", "subreddit": "tifu"},
                     "summaries": summaries, "choice": choice, "worker": "w", "extra": {"confidence": c}})
    rows.append({**rows[0], "extra": {"confidence": None}})  # some batches carry no confidence: skipped
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = main(["splits", "--data", str(data), "--out", str(tmp_path / "out")])
    _check_split_report(tmp_path / "out", report)
    first = json.loads((tmp_path / "out" / "all.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == "SUBREDDIT: r/tifu\nTITLE: t\nPOST: post 0\nTL;DR:"
    assert first["chosen"] == " ".join(WORDS)


ABLATIONS = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("config", ABLATIONS, ids=[c.stem for c in ABLATIONS])
def test_each_ablation_layers_over_the_drdo_recipe(config, capsys):
    layer = yaml.safe_load(config.read_text())
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "drdo.yaml"), "--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    assert model["class_path"] == "drdo_lightning.DRDO" and model["init_args"]["model"] == "embedded_default/sft_policy"
    for key, value in layer.get("model", {}).get("init_args", {}).items():
        assert model["init_args"][key] == value
    for key, value in layer.get("trainer", {}).items():
        assert printed["trainer"][key] == value
    assert layer.keys() <= {"model", "trainer"} and config.stem in ablations.ablation_configs()


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, tiny_task) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("eval") / "eval.jsonl", tiny_task["eval"])


def _cells(out: Path) -> list[dict]:
    with (out / "cells.csv").open() as f:
        return list(csv.DictReader(f))


def _config(run: Path) -> str:
    """A cell's training config; a cell that judged another's export (``policy``), that one's."""
    scores = run / "scores.json"
    if scores.is_file() and "policy" in (result := json.loads(scores.read_text())):
        run = Path(result["policy"]).parent
    return next(run.rglob("config.yaml")).read_text()


def test_the_robustness_configuration_at_a_tiny_size(tmp_path, tiny_model_dir, pair_files, eval_file, monkeypatch,
                                                     capsys):
    """configs/robustness.yaml: every method at its recipe's settings at each flip rate, on teachers
    retrained on that rate's noisy labels; the measures side by side across the rates."""
    out = tmp_path / "sweep"
    args = [
        "protocol", "--config", str(CONFIGS / "robustness.yaml"), "--out", str(out),
        "--conditions", json.dumps([{"name": "flip_0.25", "data": {"label_flip_rate": 0.25}}]),
        "--methods", json.dumps({"drdo": ["drdo"]}), "--seeds", "[0]",
        "--max_steps", "2", "--judge_steps", "2", "--members", "1", "--policy", str(tiny_model_dir),
        "--train_data", str(pair_files["train"]), "--val_data", str(pair_files["val"]),
        "--evaluation.prompts", str(eval_file), "--evaluation.num_prompts", "4", "--evaluation.temperatures", "[0.7]",
        "--evaluation.max_new_tokens", "6", "--evaluation.judges", json.dumps({"gold": "vader"}), "--jobs", "1",
        "--overrides", json.dumps({"data.cache_dir": str(tmp_path / "cache")}),
    ]
    table = main(args)
    assert "## Across conditions" in table and "| method | flip_0.25 |" in table and "| drdo |" in table
    assert "Oracle vs validation labels" in table and not (out / "tuning.md").exists()  # no tuning

    # The teachers were retrained on the flipped labels and rescored the data the student read.
    judges = out / "teachers" / "flip_0.25"
    assert "label_flip_rate: 0.25" in _config(judges / "oracle")
    scored = [json.loads(line) for line in (judges / "data" / "train.scored.jsonl").read_text().splitlines()]
    assert all(isinstance(r["ensemble_chosen"], float) for r in scored)  # one member: a number, not a list
    assert any(r["oracle_chosen"] != r["gold_chosen"] for r in scored)  # no longer the fixture's stand-in scores
    student = out / "flip_0.25" / "seed_0" / "drdo"
    student_config = _config(student)
    assert "label_flip_rate: 0.25" in student_config and str(judges / "data" / "train.scored.jsonl") in student_config

    (cell,) = [c for c in _cells(out) if c["measure"] == "gold" and c["temperature"] == "all"]
    assert (cell["condition"], cell["method"], cell["seed"], cell["prompts"]) == ("flip_0.25", "drdo", "0", "in")
    result = json.loads((student / "scores.json").read_text())
    assert float(cell["value"]) == pytest.approx(result["scores"]["in"]["gold"]["mean"])
    assert f"{result['scores']['in']['gold']['mean']:+.3f}" in table  # one seed: the mean, no interval
    assert (out / "across.png").read_bytes().startswith(b"\x89PNG")

    # Resuming redoes nothing: finished cells and teachers are read back.
    monkeypatch.setattr(sweeps, "run_fit", lambda *a, **k: pytest.fail("retrained a finished cell"))
    monkeypatch.setattr(conditions, "train_judges_and_score", lambda *a, **k: pytest.fail("retrained the teachers"))
    assert main(args) == table

    # A variant reuses these teachers instead of training its own; a condition without them is an error.
    monkeypatch.undo()
    monkeypatch.setattr(conditions, "train_judges_and_score", lambda *a, **k: pytest.fail("retrained the teachers"))
    variant = [*args[:4], str(tmp_path / "variant"), *args[5:], "--teachers_from", str(out)]
    assert "| drdo |" in main(variant)
    assert str(judges / "data" / "train.scored.jsonl") in _config(tmp_path / "variant" / "flip_0.25" / "seed_0" / "drdo")
    with pytest.raises(SystemExit) as exit_info:
        main([*variant, "--conditions", json.dumps([{"name": "flip_0.5", "data": {"label_flip_rate": 0.5}}])])
    assert exit_info.value.code == 2 and "flip_0.5" in capsys.readouterr().err.splitlines()[-1]


def test_ablations_train_each_variant_and_tabulate(tmp_path, tiny_model_dir, pair_files, eval_file):
    out = tmp_path / "ablations"
    table = main([
        "ablations", "--out", str(out), "--variants", "[gamma0, distill_only]", "--seeds", "[0, 1]", "--max_steps", "1",
        "--evaluation.prompts", str(eval_file), "--evaluation.num_prompts", "3", "--evaluation.temperatures", "[0.7]",
        "--evaluation.max_new_tokens", "4", "--evaluation.judges", json.dumps({"gold": "vader"}), "--policy", str(tiny_model_dir),
        "--overrides", json.dumps({"data.train_file": str(pair_files["train"]), "data.val_file": str(pair_files["val"]),
                                   "data.cache_dir": str(tmp_path / "cache"), "trainer.enable_progress_bar": False}),
    ])
    for variant in ("drdo", "gamma0", "distill_only"):
        assert f"| {variant} |" in table
        for seed in (0, 1):
            assert (out / variant / f"seed_{seed}" / "scores.json").is_file()
    config = next((out / "gamma0" / "seed_1").rglob("config.yaml")).read_text()
    assert "gamma: 0.0" in config and "seed_everything: 1" in config and f"model: {tiny_model_dir}" in config
    # The starting policy is judged once, as the table's reference row.
    start = json.loads((out / "start" / "scores.json").read_text())["scores"]["gold"]["mean"]
    assert f"| start (SFT) | {start:+.3f} |" in table
    with (out / "ablations.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"drdo", "gamma0", "distill_only"} and all(r["seeds"] == "2" for r in rows.values())
    assert (out / "ablations.png").read_bytes().startswith(b"\x89PNG")


def test_choose_takes_the_best_gold_but_drdo_only_among_settings_that_still_distil():
    entry = lambda lr, variant, gold, corr: {"setting": {"model.learning_rate": lr, "variant": variant}, "gold": gold,
                                            "reward_corr": corr, "distinct_2": 0.3}
    tuned = [entry(1e-4, "paper", 0.1, 0.90), entry(1e-4, "token_unlikelihood", 0.5, 0.70),
             entry(1e-4, "corrected", 0.3, 0.85), entry(1e-3, "paper", 0.2, 0.50), entry(1e-3, "corrected", 0.4, 0.45)]
    # 0.5 does not distil (0.70 < 0.90 - 0.1); 0.4 does, against the paper form at its own learning rate.
    assert tuning.choose(tuned, floor=0.0, tolerance=0.1) is tuned[4]
    assert tuning.choose(tuned, floor=0.0, tolerance=0.3) is tuned[1]
    # Without a tolerance (or a variant knob) only the gold reward and the diversity floor count.
    assert tuning.choose(tuned, floor=0.0, tolerance=None) is tuned[1]
    plain = [{"setting": {"model.beta": b}, "gold": g, "distinct_2": 0.3} for b, g in ((0.1, 0.1), (0.5, 0.3), (1.0, 0.2))]
    assert tuning.choose(plain, floor=0.0, tolerance=0.1)["gold"] == 0.3


def test_tuning_takes_the_best_gold_among_rates_that_keep_the_diversity():
    entry = lambda lr, gold, distinct: {"setting": {"model.learning_rate": lr}, "gold": gold, "distinct_2": distinct}
    tried = [entry(3e-4, 0.81, 0.15), entry(1e-3, 0.94, 0.24), entry(3e-3, 1.00, 0.005)]
    # 3e-3 repeats itself (distinct-2 0.005): the gold reward alone would take it.
    assert tuning.choose(tried, floor=0.08, tolerance=None)["setting"]["model.learning_rate"] == 1e-3
    assert tuning.choose(tried, floor=0.0, tolerance=None)["setting"]["model.learning_rate"] == 3e-3
    # No rate keeps the diversity: the most diverse one, not the collapsed best.
    assert tuning.choose(tried, floor=0.5, tolerance=None)["setting"]["model.learning_rate"] == 1e-3


def test_tuning_can_keep_to_a_kl_budget_where_a_far_student_games_the_judge():
    entry = lambda lr, gold, kl: {"setting": {"model.learning_rate": lr}, "gold": gold, "distinct_2": 0.2, "kl": kl}
    # 3e-3 is 425 nats from the start, writing a diverse salad of words the gold judge likes.
    tried = [entry(3e-4, 0.92, 27.1), entry(1e-3, 0.95, 90.0), entry(3e-3, 0.999, 425.2)]
    assert tuning.choose(tried, floor=0.05, tolerance=None)["setting"]["model.learning_rate"] == 3e-3
    assert tuning.choose(tried, floor=0.05, tolerance=None, max_kl=100)["setting"]["model.learning_rate"] == 1e-3
    assert tuning.choose(tried, floor=0.05, tolerance=None, max_kl=50)["setting"]["model.learning_rate"] == 3e-4


def test_a_grid_is_every_learning_rate_times_every_knob_and_a_variant_is_a_layer():
    settings = tuning.settings_of({"variant": ["paper", "corrected"], "model.alpha": [0.1, 1.0]}, [1e-3, 3e-3])
    assert len(settings) == 8 and {"model.learning_rate": 3e-3, "variant": "corrected", "model.alpha": 1.0} in settings
    assert tuning.setting_name(settings[0]) == "learning_rate=0.001,variant=paper,alpha=0.1"
    assert tuning.setting_name({}) == "recipe"
    recipe, knobs = tuning.recipe_of(["drdo"], {"model.learning_rate": 1e-3, "variant": "corrected"})
    assert recipe[0] == "drdo" and recipe[1].endswith("ablations/corrected.yaml") and len(recipe) == 2
    assert knobs == {"model.learning_rate": 1e-3}
    assert tuning.recipe_of(["drdo", "ablations/gamma0"], {"variant": "paper"})[0][1].endswith("ablations/gamma0.yaml")


def test_a_grid_grows_past_the_edge_its_choice_sits_on():
    assert sweeps.beyond_edge(1e-3, [1e-4, 3e-4, 1e-3]) == pytest.approx(3e-3)
    assert sweeps.beyond_edge(3e-3, [1e-4, 3e-4, 1e-3, 3e-3]) == pytest.approx(1e-2)
    assert sweeps.beyond_edge(1e-4, [1e-4, 3e-4, 1e-3]) == pytest.approx(3e-5)
    assert sweeps.beyond_edge(3e-5, [3e-5, 1e-4]) == pytest.approx(1e-5)
    assert sweeps.beyond_edge(3e-4, [1e-4, 3e-4, 1e-3]) is None  # interior
    assert sweeps.beyond_edge(1e-3, [1e-3]) == pytest.approx(3e-3)  # one value: grow upwards


def test_the_comparison_configuration_at_a_tiny_size(tmp_path, tiny_model_dir, pair_files, eval_file, monkeypatch):
    """configs/compare.yaml: tuned on held-out prompts at flip 0 (learning rate times the main knob, DRDO
    forms that still distil), then the chosen settings at each flip rate and seed, per temperature."""
    out = tmp_path / "compare"
    args = [
        "protocol", "--config", str(CONFIGS / "compare.yaml"), "--out", str(out),
        "--conditions", json.dumps([{"name": f"flip_{r}", "data": {"label_flip_rate": r}} for r in (0.0, 0.25)]),
        "--methods", json.dumps({"drdo": ["drdo"], "dpo": ["dpo"]}), "--learning_rates", "[1e-3]",
        "--grid", json.dumps({"drdo": {"variant": ["paper", "corrected"]}, "dpo": {"model.beta": [0.1, 0.5]}}),
        "--seeds", "[0, 1]", "--max_steps", "2", "--judge_steps", "2", "--members", "1",
        "--max_grid_extensions", "1",
        "--num_tuning_prompts", "5", "--policy", str(tiny_model_dir), "--sft_data", str(pair_files["sft"]),
        "--train_data", str(pair_files["train"]), "--val_data", str(pair_files["val"]),
        "--oracle_shape", json.dumps({"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                                      "num_attention_heads": 2, "num_key_value_heads": 2}),
        "--evaluation.prompts", str(eval_file), "--evaluation.temperatures", "[0.7, 1.0]", "--evaluation.max_new_tokens",
        "6", "--evaluation.judges", json.dumps({"gold": "vader"}), "--jobs", "2",
        "--overrides", json.dumps({"data.cache_dir": str(tmp_path / "cache"), "trainer.max_steps": 2}),
    ]
    table = main(args)

    # Tuning prompts: prompts of the validation pairs, none of them an evaluation prompt.
    tuning_prompts = [json.loads(line)["prompt"] for line in (out / "tuning_prompts.jsonl").read_text().splitlines()]
    evaluation = {json.loads(line)["prompt"] for line in eval_file.read_text().splitlines()}
    assert len(tuning_prompts) == 5 and not set(tuning_prompts) & evaluation
    assert {json.loads(line)["prompt"] for line in pair_files["val"].read_text().splitlines()} >= set(tuning_prompts)

    # The Oracle starts from its own, larger SFT policy; the ensemble from the students' policy.
    oracle_config = _config(out / "teachers" / "flip_0.25" / "oracle")
    assert str(out / "oracle_policy" / "sft" / "export") in oracle_config and "label_flip_rate: 0.25" in oracle_config
    assert json.loads((out / "oracle_policy" / "sft" / "export" / "config.json").read_text())["hidden_size"] == 48
    assert f"model: {tiny_model_dir}" in _config(out / "teachers" / "flip_0.25" / "ensemble")

    # Every tuning cell was judged on the tuning prompts; DRDO's also measured how it distils. A
    # one-rate grid's choice sits at its edge, so each method's grid grew once (every knob at 3e-3).
    tuned = list(csv.DictReader((out / "tuning.csv").open()))
    assert sorted(t["setting"] for t in tuned) == sorted(
        f"learning_rate={lr},{knob}" for lr in ("0.001", "0.003")
        for knob in ("variant=paper", "variant=corrected", "beta=0.1", "beta=0.5"))
    assert all(-1 <= float(t["reward_corr"]) <= 1 for t in tuned if t["method"] == "drdo")
    corrected = _config(out / "tuning" / "drdo" / "learning_rate=0.001,variant=corrected")
    assert "preference_form: corrected" in corrected and "label_flip_rate: 0.0" in corrected
    tuning_md = (out / "tuning.md").read_text()
    assert tuning_md.count("| **") == 2  # one chosen setting per method
    assert ("Learning rates tried at the chosen knobs: drdo: 0.001, 0.003 (chosen at an edge); "
            "dpo: 0.001, 0.003 (chosen at an edge).") in tuning_md
    assert "Knob values tried at the chosen other settings: drdo: variant corrected, paper; dpo: beta 0.1, 0.5 (chosen at an edge)." in tuning_md

    # The chosen settings ran at every flip rate with every seed, on that rate's teachers (at flip 0
    # and the tuning's seed, the tuning cell's export, judged again rather than trained again).
    chosen = {t["method"]: t for t in tuned if f"**{t['setting']}**" in tuning_md}
    evaluated = json.loads((out / "flip_0.0" / "seed_0" / "dpo" / "scores.json").read_text())
    assert evaluated["policy"] == str(out / "tuning" / "dpo" / chosen["dpo"]["setting"] / "export")
    for rate in ("0.0", "0.25"):
        for seed in (0, 1):
            config = _config(out / f"flip_{rate}" / f"seed_{seed}" / "dpo")
            assert f"beta: {chosen['dpo']['setting'].split('beta=')[1]}" in config
            assert str(out / "teachers" / f"flip_{rate}" / "data" / "train.scored.jsonl") in config
            assert f"seed_everything: {seed}" in config
    summary = list(csv.DictReader((out / "summary.csv").open()))
    gold = [s for s in summary if s["measure"] == "gold"]
    assert {(s["condition"], s["method"], s["temperature"]) for s in gold} == {
        (f"flip_{r}", m, t) for r in ("0.0", "0.25") for m in ("drdo", "dpo") for t in ("all", "0.7", "1.0")}
    assert all(s["seeds"] == "2" for s in summary)
    assert {s["measure"] for s in summary} == {"gold", "distinct_2", "kl", "reward_corr"}
    for heading in ("## By temperature", "gold reward", "distinct-2 of the generations", "reward-margin correlation",
                    "| condition | method | pooled | T = 0.7 | T = 1.0 |"):
        assert heading in table
    assert (out / "across.png").read_bytes().startswith(b"\x89PNG")

    # Resuming redoes nothing.
    monkeypatch.setattr(sweeps, "run_fit", lambda *a, **k: pytest.fail("retrained a finished cell"))
    monkeypatch.setattr(conditions, "train_judges_and_score", lambda *a, **k: pytest.fail("retrained the teachers"))
    monkeypatch.setattr(stages, "run_fit", lambda *a, **k: pytest.fail("retrained the Oracle's policy"))
    assert main([*args[:-4], "--jobs", "1", *args[-2:]]) == table

