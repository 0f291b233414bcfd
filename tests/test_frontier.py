"""Every method at equal KL: reading a traced curve at a KL level, the estimate over seeds, the verdict,
the tuning's searches on hand-made rewards, the cells a run shares, and configs/frontier.yaml end to end
at a tiny size."""

from __future__ import annotations

import csv
import json
import math
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml

from drdo_lightning.cli import main
from drdo_lightning.evaluation.statistics import Estimate
from drdo_lightning.experiments import cells as cells_module
from drdo_lightning.experiments import conditions, frontier, sweeps, tuning
from drdo_lightning.experiments.sweeps import seed_interval
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.training import RunSpec

ROOT = Path(__file__).resolve().parents[1]
LR = tuning.LEARNING_RATE


# ---------------------------------------------------------------------------------------
# Reading a curve


def test_a_curve_is_read_between_the_points_that_bracket_the_level_and_never_outside():
    curve = [(2.0, 0.1), (8.0, 0.4), (30.0, 0.7), (70.0, 0.6)]
    assert frontier.read_at(curve, 5.0) == pytest.approx(0.1 + 0.3 * 3 / 6)
    assert frontier.read_at(curve, 20.0) == pytest.approx(0.4 + 0.3 * 12 / 22)
    assert frontier.read_at(curve, 40.0) == pytest.approx(0.7 - 0.1 * 10 / 40)
    assert frontier.read_at(curve, 8.0) == pytest.approx(0.4)  # on a point: its value
    assert frontier.read_at(curve, 2.0) == pytest.approx(0.1) and frontier.read_at(curve, 70.0) == pytest.approx(0.6)
    # A level the curve never reaches, above or below: no number, not an extrapolated one.
    assert frontier.read_at(curve, 80.0) is None and frontier.read_at(curve, 1.0) is None
    assert frontier.read_at([], 5.0) is None and frontier.read_at([(5.0, 0.3)], 5.0) == pytest.approx(0.3)
    # Points given along the knob (KL falling as beta grows) read the same as in order of KL; two
    # neighbours a seed's noise swapped are read in order of KL.
    assert frontier.read_at(curve[::-1], 20.0) == frontier.read_at(curve, 20.0)
    swapped = [(2.0, 0.1), (30.0, 0.7), (8.0, 0.4), (70.0, 0.6)]
    assert frontier.read_at(swapped, 5.0) == frontier.read_at(curve, 5.0)


def test_the_estimate_at_a_level_needs_every_seeds_curve_to_reach_it():
    by_seed = {0: [(4.0, 0.2), (12.0, 0.6)], 1: [(6.0, 0.3), (16.0, 0.5)], 2: [(2.0, 0.0), (30.0, 0.7)]}
    readings = [0.2 + 0.4 * 6 / 8, 0.3 + 0.2 * 4 / 10, 0.7 * 8 / 28]
    assert frontier.at_level(by_seed, 10.0) == pytest.approx(tuple(seed_interval(readings)))
    assert frontier.at_level(by_seed, 5.0) is None  # seed 1 starts at KL 6
    assert frontier.at_level(by_seed, 20.0) is None  # seeds 0 and 1 stop short of it
    assert frontier.at_level({}, 10.0) is None


def test_the_verdict_separates_only_where_the_intervals_do():
    drdo = Estimate(0.80, 0.75, 0.85)
    assert frontier.verdict(drdo, Estimate(0.60, 0.55, 0.70)) == frontier.AHEAD
    assert frontier.verdict(drdo, Estimate(0.95, 0.90, 1.00)) == frontier.BEHIND
    assert frontier.verdict(drdo, Estimate(0.70, 0.60, 0.76)) == frontier.LEVEL  # overlap by 0.01
    assert frontier.verdict(Estimate(0.9, math.nan, math.nan), Estimate(0.1, math.nan, math.nan)) == frontier.LEVEL
    assert frontier.verdict(None, drdo) is None and frontier.verdict(drdo, None) is None


def _cell(kl: float, gold: float) -> dict:
    return {"scores": {"in": {"kl": {"mean": kl}, "gold": {"mean": gold}}}}


def test_the_equal_kl_and_verdict_tables_are_read_off_the_traced_cells():
    # DRDO's curves lie 0.5 above DPO's at every KL, three seeds each; DPO never comes below KL 6.
    traced = {"bt": {}}
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        for alpha, kl in ((0.01, 3.0), (0.1, 9.0), (1.0, 25.0)):
            traced["bt"][("drdo", alpha, seed)] = _cell(kl, 0.01 * kl + 0.5 + noise)
        for beta, kl in ((1.0, 6.0), (0.1, 18.0), (0.01, 50.0)):
            traced["bt"][("dpo", beta, seed)] = _cell(kl, 0.01 * kl + noise)
    table = frontier.equal_kl_table(traced, {"drdo": "model.alpha", "dpo": "model.beta"}, [5.0, 10.0, 40.0])
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]] for line in table.splitlines()[2:]}
    assert rows["drdo"][:3] == ["alpha 0.01, 0.1, 1", "3", "3.0-25.0"]
    assert rows["drdo"][3].startswith("+0.550 [") and rows["drdo"][4].startswith("+0.600 [") and rows["drdo"][5] == "-"
    assert rows["dpo"][3] == "-" and rows["dpo"][4].startswith("+0.100 [") and rows["dpo"][5].startswith("+0.400 [")
    # Beside it a condition only run at the tuned points: compared there, each side's KL in brackets.
    summary = {("flip", "drdo", "in", "gold", "all"): {"value": 0.5, "low": 0.4, "high": 0.6, "seeds": 5},
               ("flip", "dpo", "in", "gold", "all"): {"value": 0.55, "low": 0.5, "high": 0.6, "seeds": 5},
               ("flip", "drdo", "in", "kl", "all"): {"value": 9.2, "low": 8.0, "high": 10.0, "seeds": 5},
               ("flip", "dpo", "in", "kl", "all"): {"value": 61.0, "low": 50.0, "high": 70.0, "seeds": 5}}
    verdicts = frontier.verdict_table(traced, summary, ["bt", "flip", "never_run"], {"drdo": ["dpo", "edpo"]},
                                      [5.0, 10.0, 40.0])
    lines = verdicts.splitlines()
    assert lines[0] == "| condition | method | vs dpo | vs edpo |"
    assert lines[2] == "| bt | drdo | ahead at KL 10 | not run |"  # the one level both reach
    assert lines[3] == "| flip | drdo | level at the tuned points (KL 9.2 vs 61.0) | not run |" and len(lines) == 4
    # Apart at one level, together at another: each level says its own. DRDO traced on to KL 100,
    # where its curve falls to meet DPO's at KL 40.
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        traced["bt"][("drdo", 10.0, seed)] = _cell(100.0, -1.0 + noise)
    assert "ahead at KL 10; level at KL 40" in frontier.verdict_table(traced, {}, ["bt"], {"drdo": ["dpo"]}, [10.0, 40.0])


def test_distinct_2_is_read_at_equal_kl_beside_the_gold_reward_a_repetitive_policy_can_game():
    # Online DPO's gold rises with KL as its answers collapse into repetition; DRDO keeps its diversity.
    traced = {"bt": {}}
    for seed, noise in enumerate((0.0, 0.002, -0.002)):
        for lr, kl, gold, distinct in ((1e-4, 5.0, 0.80, 0.10), (2e-4, 45.0, 0.97, 0.01)):
            traced["bt"][("online_dpo", lr, seed)] = {"scores": {"in": {
                "kl": {"mean": kl}, "gold": {"mean": gold}, "distinct_2": {"mean": distinct + noise}}}}
        for lr, kl, gold, distinct in ((1e-4, 4.0, 0.60, 0.16), (2e-4, 44.0, 0.90, 0.12)):
            traced["bt"][("online_drdo", lr, seed)] = {"scores": {"in": {
                "kl": {"mean": kl}, "gold": {"mean": gold}, "distinct_2": {"mean": distinct + noise}}}}
    knobs = {"online_dpo": "model.learning_rate", "online_drdo": "model.learning_rate"}
    table = frontier.equal_kl_table(traced, knobs, [25.0], frontier.DISTINCT)
    assert table.splitlines()[0].endswith("| distinct-2 at KL 25 |")
    rows = {line.split("|")[2].strip(): line.split("|")[6].strip() for line in table.splitlines()[2:]}
    assert rows["online_dpo"].startswith("+0.055 [") and rows["online_drdo"].startswith("+0.139 [")
    sections = "\n".join(frontier.Frontiers(traced, knobs, [25.0]).sections({}, ["bt"]))
    assert sections.index("## Gold reward at equal KL") < sections.index("## Distinct-2 at equal KL")
    for cell in traced["bt"].values():
        del cell["scores"]["in"]["distinct_2"]
    assert "Distinct-2" not in "\n".join(frontier.Frontiers(traced, knobs, [25.0]).sections({}, ["bt"]))


def test_gold_against_the_oracles_reward_shows_a_proxy_over_optimised(tmp_path, caplog):
    """Along online DPO's knob the Oracle's reward rises while the gold reward peaks and falls (over-
    optimisation); DRDO's rise together. Two seeds each, the table's rows their means in the knob's order."""
    traced = {"bt": {}}
    for seed, noise in enumerate((0.01, -0.01)):
        for beta, kl, oracle, gold in ((1.0, 2.0, 0.1, 0.2), (0.1, 10.0, 0.5, 0.4), (0.01, 40.0, 0.9, -0.3)):
            traced["bt"][("online_dpo", beta, seed)] = {"scores": {"in": {
                "kl": {"mean": kl}, "gold": {"mean": gold + noise}, "oracle": {"mean": oracle - noise}}}}
        for alpha, kl, oracle, gold in ((0.01, 3.0, 0.2, 0.1), (1.0, 9.0, 0.4, 0.3)):
            traced["bt"][("drdo", alpha, seed)] = {"scores": {"in": {
                "kl": {"mean": kl}, "gold": {"mean": gold + noise}, "oracle": {"mean": oracle}}}}
    table = frontier.overoptimisation_table(traced, {"online_dpo": "model.beta", "drdo": "model.alpha"})
    lines = table.splitlines()
    assert lines[0] == "| condition | method | point | KL (nats) | Oracle reward | gold reward |"
    assert lines[2:] == ["| bt | online_dpo | beta 0.01 | 40.0 | +0.900 | -0.300 |",
                         "| bt | online_dpo | beta 0.1 | 10.0 | +0.500 | +0.400 |",
                         "| bt | online_dpo | beta 1 | 2.0 | +0.100 | +0.200 |",
                         "| bt | drdo | alpha 0.01 | 3.0 | +0.200 | +0.100 |",
                         "| bt | drdo | alpha 1 | 9.0 | +0.400 | +0.300 |"]
    fronts = frontier.Frontiers(traced, {"online_dpo": "model.beta", "drdo": "model.alpha"}, [5.0])
    assert "## Gold against the Oracle's reward along the frontier" in "\n".join(fronts.sections({}, ["bt"]))
    fronts.write(tmp_path, {}, ["bt"])
    assert (tmp_path / "overoptimisation.png").read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((tmp_path / "frontier.csv").open()))
    assert {(r["method"], r["value"], r["seed"], r["oracle"]) for r in rows} >= {("online_dpo", "0.01", "0", "0.89")}
    # Cells without the Oracle's judgement: no such section, plot or column, and the log says why.
    for cell in traced["bt"].values():
        del cell["scores"]["in"]["oracle"]
    (tmp_path / "overoptimisation.png").unlink()
    with caplog.at_level("INFO", logger=frontier.__name__):
        fronts.write(tmp_path, {}, ["bt"])
    assert not (tmp_path / "overoptimisation.png").exists() and "no judge named 'oracle'" in caplog.text
    assert "Oracle" not in "\n".join(fronts.sections({}, ["bt"]))
    assert "oracle" not in next(csv.DictReader((tmp_path / "frontier.csv").open()))


# ---------------------------------------------------------------------------------------
# The tuning's searches


def _run(search: tuning.Search, gold) -> list[dict]:
    """Drive a search as the protocol does, each setting's gold reward from ``gold``; every setting run, in order."""
    runs: dict[str, dict] = {}
    pending = search.settings()
    while pending is not None:
        for s in pending:
            runs.setdefault(tuning.setting_name(s), s)
        entries = [{"setting": s, "gold": gold(s), "distinct_2": 1.0} for s in pending]
        pending = search.advance(tuning.choose(entries, floor=0.0, tolerance=None)["setting"])
    return list(runs.values())


def _peak(lr: float, beta: float):
    """A gold reward that peaks at ``lr`` and ``beta`` (log-quadratic in each)."""
    return lambda s: -math.log10(s[LR] / lr) ** 2 - math.log10(s["model.beta"] / beta) ** 2


def test_coordinates_tune_the_rate_then_the_knob_then_the_rate_again_each_choice_interior():
    search = tuning.Search({"model.beta": [0.1, 0.03, 0.3]}, [3e-4, 1e-3, 3e-3], tuning.COORDINATES,
                           max_extensions=2, extend_knobs=True)
    runs = _run(search, _peak(1e-3, 1.0))
    assert search.center == {LR: 1e-3, "model.beta": 1.0}
    names = [tuning.setting_name(s) for s in runs]
    assert names == [
        "learning_rate=0.0003,beta=0.1", "learning_rate=0.001,beta=0.1", "learning_rate=0.003,beta=0.1",  # the rate
        "learning_rate=0.001,beta=0.03", "learning_rate=0.001,beta=0.3",  # the knob at that rate ...
        "learning_rate=0.001,beta=1.0", "learning_rate=0.001,beta=3.0",  # ... grown past its edge until interior
        "learning_rate=0.0003,beta=1.0", "learning_rate=0.003,beta=1.0",  # the rate again: its neighbours
    ]
    # Without extend_knobs the knob stays at its edge; the rate still grows.
    search = tuning.Search({"model.beta": [0.1, 0.03, 0.3]}, [3e-4, 1e-3], tuning.COORDINATES, max_extensions=1)
    _run(search, _peak(1e-3, 1.0))
    assert search.center == {LR: 1e-3, "model.beta": 0.3}
    # An axis grows at most max_extensions steps in a pass.
    search = tuning.Search({"model.beta": [0.1]}, [1e-3], tuning.COORDINATES, max_extensions=1, extend_knobs=True)
    _run(search, _peak(1e-1, 10.0))
    # One step in each pass: 1e-3 -> 3e-3 in the first; the last starts at its neighbours and grows 1e-2 -> 3e-2.
    assert search.center == {LR: 3e-2, "model.beta": 0.3}


def test_a_grid_search_is_every_combination_grown_along_the_rate_only_unless_knobs_grow_too():
    grid = {"variant": ["paper", "corrected"], "model.beta": [0.1, 0.3]}
    search = tuning.Search(grid, [1e-3], tuning.GRID, max_extensions=1)
    runs = _run(search, lambda s: _peak(1e-2, 3.0)(s) + (s["variant"] == "corrected"))
    assert len(runs) == 8 and {s[LR] for s in runs} == {1e-3, 3e-3}  # every knob value at the grown rate
    assert search.center == {LR: 3e-3, "variant": "corrected", "model.beta": 0.3}
    search = tuning.Search(grid, [1e-3], tuning.GRID, max_extensions=1, extend_knobs=True)
    runs = _run(search, lambda s: _peak(1e-2, 3.0)(s) + (s["variant"] == "corrected"))
    assert len(runs) == 12 and search.center == {LR: 3e-3, "variant": "corrected", "model.beta": 1.0}
    assert tuning.settings_of(grid, [1e-3]) == tuning.Search(grid, [1e-3]).settings()
    with pytest.raises(ValueError, match="search must be one of"):
        tuning.Search(grid, [1e-3], "random")


def test_a_student_reads_the_teachers_scores_where_its_recipe_names_a_score_column():
    assert tuning.reads_scores(("drdo",)) and tuning.reads_scores(("edpo",))
    assert not tuning.reads_scores(("dpo",)) and not tuning.reads_scores(("simpo",))
    assert tuning.extensible([0.1, 3]) and not tuning.extensible(["none", "std"]) and not tuning.extensible([0.0, 1.0])
    assert not tuning.extensible([True])


def test_identical_cells_are_copied_and_a_finished_training_is_judged_again(tmp_path, monkeypatch):
    """:class:`cells.Cells` on a pool that records what it was asked to run."""
    asked = []

    class Pool:
        def submit(self, fn, folder, run, families, *args, policy=None):
            asked.append((folder.name, run is not None, policy))
            future: Future = Future()
            if run is not None:  # a trained cell leaves its export
                (folder / "export").mkdir(parents=True)
                (folder / "export" / "config.json").write_text("{}")
            future.set_result({"scores": {"families": sorted(families)}, "train_seconds": 5.0, "eval_seconds": 1.0})
            return future

    cells = cells_module.Cells(Pool(), "val.jsonl", "sft")
    run = RunSpec("dpo", seed=0, train_file="a.jsonl", overrides={"model.beta": 0.1})
    key = cells_module.training_key(run)
    tuned = cells.submit(tmp_path / "tuning", run, {"tuning": None}, key).result()
    evaluated = cells.submit(tmp_path / "evaluation", run, {"in": None, "ood": None}, key).result()
    copy = cells.submit(tmp_path / "frontier", run, {"in": None, "ood": None}, key).result()
    assert asked == [("tuning", True, None), ("evaluation", False, str(tmp_path / "tuning" / "export"))]
    assert tuned["scores"] == {"families": ["tuning"]} and evaluated["scores"] == {"families": ["in", "ood"]}
    assert copy["same_as"] == str(tmp_path / "evaluation") and copy["train_seconds"] == 0.0
    assert json.loads((tmp_path / "frontier" / "scores.json").read_text()) == copy
    # The same run on other files is another cell, unless both stand for the same pairs.
    other = RunSpec("dpo", seed=0, train_file="b.jsonl", overrides={"model.beta": 0.1})
    assert cells_module.training_key(other) != key
    assert cells_module.training_key(other, "hard pairs") == cells_module.training_key(run, "hard pairs")
    assert cells_module.training_key(RunSpec("dpo", seed=1, train_file="a.jsonl", overrides={"model.beta": 0.1})) != key


# ---------------------------------------------------------------------------------------
# The configuration


def test_the_frontier_configuration_traces_every_method_along_its_distance_knob(capsys):
    with pytest.raises(SystemExit):
        main(["protocol", "--config", str(ROOT / "configs" / "frontier.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert [c["name"] for c in printed["conditions"]] == ["bt_s2", "hard_all_pairs", "low_margin_0.2", "sample_all_pairs"]
    assert printed["search"] == "coordinates" and printed["extend_knobs"] and printed["min_distinct_ratio"] == 0.25
    assert printed["frontier_conditions"] == ["bt_s2", "hard_all_pairs"] and printed["frontier_seeds"] == 3
    assert printed["seeds"] == [0, 1, 2, 3, 4] and (printed["jobs"], printed["threads"]) == (2, 1)
    assert printed["kl_levels"] == [5.0, 10.0, 20.0, 40.0]
    methods, grid, traced = printed["methods"], printed["grid"], printed["frontier"]
    readings = {m for m, layers in methods.items() if layers[0] == "drdo"}
    assert readings == {"drdo", "drdo_logps"} and methods["drdo_logps"] == ["drdo", "ablations/student_logps"]
    for reading in readings:  # learning rate x alpha x target scale (normalised or not), for each reading
        assert {"model.alpha", "model.target_scale", "model.target_normalization"} <= set(grid[reading])
        assert printed["verdict"][reading] == ["dpo", "edpo", "dpo_relabelled"]
    distance = {"dpo": "model.beta", "cdpo": "model.beta", "rdpo": "model.beta", "edpo": "model.beta",
                "ipo": "model.tau", "simpo": "model.beta", "drdo": "model.alpha", "drdo_logps": "model.target_scale"}
    # Traced along the learning rate where the knob alone left the KL levels unbracketed (at the
    # tuned rate, DPO's beta never came under 65 nats; DRDO's alpha never above 26); the knob's
    # own trace is an overlay.
    by_rate = {"dpo", "edpo", "drdo", "drdo_logps"}
    with pytest.raises(SystemExit):
        main(["protocol", "--config", str(ROOT / "configs" / "frontier.yaml"),
              "--config", str(ROOT / "configs" / "frontier_knobs.yaml"), "--print_config"])
    knob_traced = yaml.safe_load(capsys.readouterr().out)["frontier"]
    for method, knob in distance.items():
        assert knob in grid[method]  # tuned on the knob that sets its distance, not only the learning rate
        want = "model.learning_rate" if method in by_rate else knob
        assert list(traced[method]) == [want] and 3 <= len(traced[method][want]) <= 5
        assert list(knob_traced[method]) == [knob] and len(knob_traced[method][knob]) == 5
    # The recipe's own value first: the coordinates start there.
    assert grid["dpo"]["model.beta"][0] == 0.1 and grid["ipo"]["model.tau"][0] == 0.1
    assert grid["simpo"]["model.beta"][0] == 2.0 and grid["drdo"]["model.alpha"][0] == 0.1


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, tiny_task) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("eval") / "eval.jsonl", tiny_task["eval"])


@pytest.mark.slow
def test_the_frontier_configuration_at_a_tiny_size(tmp_path, tiny_model_dir, pair_files, eval_file, monkeypatch):
    """configs/frontier.yaml: tuned by coordinates, traced along each distance knob on two conditions,
    the equal-KL and verdict tables read off the cells; identical cells shared; resumable."""
    out = tmp_path / "frontier"
    bt = {"label_noise": "bt", "noise_temperature": 2.0, "noise_score_columns": ["gold_chosen", "gold_rejected"]}
    args = [
        "protocol", "--config", str(ROOT / "configs" / "frontier.yaml"), "--out", str(out),
        "--conditions", json.dumps([{"name": "bt", "data": bt}, {"name": "hard_all", "split": "hard", "teacher": "all_pairs"},
                                    {"name": "hard_own", "split": "hard", "seeds": 1}]),
        "--methods", json.dumps({"drdo": ["drdo"], "drdo_logps": ["drdo", "ablations/student_logps"], "dpo": ["dpo"]}),
        "--learning_rates", "[1e-3]",
        "--grid", json.dumps({"drdo": {"model.target_normalization": ["none", "std"]}, "dpo": {"model.beta": [0.1, 0.5]}}),
        "--max_grid_extensions", "0", "--tuning_condition", "bt",
        "--frontier", json.dumps({"drdo": {"model.alpha": [0.01, 1.0]}, "drdo_logps": {"model.target_scale": [0.3, 3.0]},
                                  "dpo": {"model.beta": [0.01, 1.0]}}),
        "--frontier_conditions", '["bt", "hard_all"]', "--frontier_seeds", "2", "--seeds", "[0, 1, 2]",
        "--verdict", json.dumps({"drdo": ["dpo", "dpo_relabelled"], "drdo_logps": ["dpo"]}),
        "--max_steps", "2", "--judge_steps", "2", "--members", "1", "--num_tuning_prompts", "4",
        "--policy", str(tiny_model_dir), "--train_data", str(pair_files["train"]), "--val_data", str(pair_files["val"]),
        "--evaluation.prompts", str(eval_file), "--evaluation.num_prompts", "4", "--evaluation.max_new_tokens", "6",
        "--evaluation.temperatures", "[1.0]", "--evaluation.judges", json.dumps({"gold": "vader"}), "--ood_prompts", "null",
        "--jobs", "1", "--overrides", json.dumps({"data.cache_dir": str(tmp_path / "cache")}),
    ]
    table = main(args)

    # Coordinates: the rate (one value, no growth), then the knob at it, then the rate's neighbours.
    tuned = {(t["method"], t["setting"]) for t in csv.DictReader((out / "tuning.csv").open())}
    chosen = json.loads((out / "chosen.json").read_text())
    beta, normalization = chosen["dpo"]["model.beta"], chosen["drdo"]["model.target_normalization"]
    assert {s for m, s in tuned if m == "dpo"} == {"learning_rate=0.001,beta=0.1", "learning_rate=0.001,beta=0.5",
                                                     f"learning_rate=0.0003,beta={beta}", f"learning_rate=0.003,beta={beta}"}
    assert {s for m, s in tuned if m == "drdo"} == {
        "learning_rate=0.001,target_normalization=none", "learning_rate=0.001,target_normalization=std",
        f"learning_rate=0.0003,target_normalization={normalization}", f"learning_rate=0.003,target_normalization={normalization}"}
    assert {s for m, s in tuned if m == "drdo_logps"} == {f"learning_rate={lr}" for lr in ("0.0003", "0.001", "0.003")}

    # The frontier: each traced value and the tuned one, two seeds, on both traced conditions; the
    # relabelled control follows DPO's on the all-pairs arm; nothing traced on hard_own.
    points = list(csv.DictReader((out / "frontier.csv").open()))
    by = lambda c, m: {(float(p["value"]), int(p["seed"])) for p in points if p["condition"] == c and p["method"] == m}
    for condition in ("bt", "hard_all"):
        assert by(condition, "dpo") == {(v, s) for v in {0.01, 1.0, beta} for s in (0, 1)}
        assert by(condition, "drdo") == {(v, s) for v in (0.01, 1.0) for s in (0, 1)}  # alpha was not tuned
        assert by(condition, "drdo_logps") == {(v, s) for v in (0.3, 3.0) for s in (0, 1)}
    assert by("hard_all", "dpo_relabelled") == by("hard_all", "dpo") and not by("bt", "dpo_relabelled")
    assert not by("hard_own", "dpo")
    # The tuned point of the frontier is the evaluation's cell, copied; the evaluation's seed 0 on the
    # tuning condition judged the tuning cell's export; DPO on hard_own is DPO on hard_all.
    tuned_point = json.loads((out / "bt" / "frontier" / "dpo" / f"beta={beta}" / "seed_1" / "scores.json").read_text())
    assert tuned_point["same_as"] == str(out / "bt" / "seed_1" / "dpo")
    evaluated = json.loads((out / "bt" / "seed_0" / "dpo" / "scores.json").read_text())
    assert evaluated["policy"] == str(out / "tuning" / "dpo" / tuning.setting_name(chosen["dpo"]) / "export")
    own = json.loads((out / "hard_own" / "seed_0" / "dpo" / "scores.json").read_text())
    assert own["same_as"] == str(out / "hard_all" / "seed_0" / "dpo")
    assert "same_as" not in json.loads((out / "hard_own" / "seed_0" / "drdo" / "scores.json").read_text())

    # The equal-KL table and the verdict, first in protocol.md, read off those cells.
    assert table.startswith("## Verdict at equal KL") and "## Gold reward at equal KL" in table
    readings = list(csv.DictReader((out / "equal_kl.csv").open()))
    assert {r["measure"] for r in readings} == {"gold", "distinct_2"} and "## Distinct-2 at equal KL" in table
    equal_kl = [r for r in readings if r["measure"] == "gold"]
    assert {(r["condition"], r["method"]) for r in equal_kl} == {
        (c, m) for c in ("bt", "hard_all") for m in ("dpo", "drdo", "drdo_logps")} | {("hard_all", "dpo_relabelled")}
    for r in equal_kl:  # each reading exactly what the pure functions make of the cells' curves
        curves = {}
        for p in points:
            if (p["condition"], p["method"]) == (r["condition"], r["method"]):
                curves.setdefault(int(p["seed"]), []).append((float(p["kl"]), float(p["gold"])))
        expected = frontier.at_level(curves, float(r["kl"]))
        assert (r["value"] == "") == (expected is None)
        if expected is not None:
            assert float(r["value"]) == pytest.approx(expected.value)
    verdict_rows = [line for line in table.split("## Gold reward at equal KL")[0].splitlines() if line.startswith("| ")]
    assert verdict_rows[0] == "| condition | method | vs dpo | vs dpo_relabelled |"
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in verdict_rows[1:]}
    assert set(rows) == {(c, m) for c in ("bt", "hard_all", "hard_own") for m in ("drdo", "drdo_logps")}
    assert rows[("bt", "drdo")] == "| bt | drdo | no common KL level | not run |"  # a tiny policy never moves 5 nats
    assert rows[("bt", "drdo_logps")] == "| bt | drdo_logps | no common KL level |  |"
    assert rows[("hard_own", "drdo")].startswith("| hard_own | drdo | level at the tuned points (KL ")
    assert "drdo_logps log-prob margin" in table and "drdo_logps reward head" not in table  # no head to rank by
    assert (out / "frontier_curves.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "equal_kl.md").read_text().startswith("## Verdict at equal KL")

    # Resuming redoes nothing; the tables of what is finished read back the same.
    monkeypatch.setattr(sweeps, "run_fit", lambda *a, **k: pytest.fail("retrained a finished cell"))
    monkeypatch.setattr(conditions, "train_judges_and_score", lambda *a, **k: pytest.fail("retrained the teachers"))
    assert main(args) == table
    assert main([*args, "--report_only", "true"]) == table
    # A tiny policy hardly moves (KL near 0): read the curves again at a level every seed of DPO on
    # hard_all reaches, and the table has its number.
    curves = {}
    for p in points:
        if (p["condition"], p["method"]) == ("hard_all", "dpo"):
            curves.setdefault(int(p["seed"]), []).append((float(p["kl"]), float(p["gold"])))
    level = (max(min(c)[0] for c in curves.values()) + min(max(c)[0] for c in curves.values())) / 2
    main([*args, "--report_only", "true", "--kl_levels", json.dumps([level])])
    (row,) = [r for r in csv.DictReader((out / "equal_kl.csv").open())
              if (r["condition"], r["method"], r["measure"]) == ("hard_all", "dpo", "gold")]
    assert float(row["value"]) == pytest.approx(frontier.at_level(curves, level).value) and row["seeds"] == "2"
