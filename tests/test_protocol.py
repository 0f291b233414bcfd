"""The experiment engine in the paper's regime: its data (Table 1 splits, relabelled control), the
margins it ranks pairs by, the KL next to the rewards, its tables, the runs it builds for an online
method, every shipped configuration parsed, and one tiny run of configs/protocol.yaml's kind of
conditions."""

from __future__ import annotations

import json
import math
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from drdo_lightning.cli import main
from drdo_lightning.data.readers import read_rows
from drdo_lightning.embedded_default import EMBEDDED
from drdo_lightning.errors import UserError
from drdo_lightning.evaluation.margins import IMPLICIT, LOGP, REWARD_HEAD, pair_margins
from drdo_lightning.experiments import cells, conditions, protocol, protocol_report, tuning
from drdo_lightning.experiments.sweeps import KL, EvalSettings, Evaluator
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.models import CausalLMWithRewardHead
from drdo_lightning.scoring import score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, tiny_task):
    return write_jsonl(tmp_path_factory.mktemp("eval") / "eval.jsonl", tiny_task["eval"])


def _rows(path) -> list[dict]:
    return [row for _, row in read_rows(str(path))]


def _summed_logp(lm, tokenizer, prompt: str, response: str) -> float:
    """log π(response | prompt) by hand: BOS + prompt, response + EOS, one forward, summed log-softmax."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(lm(ids).logits.float(), -1)[0, :-1]
    targets = ids[0, 1:]
    picked = logps.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1:].sum())


def test_pair_margins_equal_a_hand_computation(tmp_path, tiny_model_dir, tiny_tokenizer, pair_files):
    torch.manual_seed(1)
    with_head = CausalLMWithRewardHead.from_pretrained(tiny_model_dir)  # a new, random reward head
    with_head.save_pretrained(tmp_path / "with_head", tokenizer=tiny_tokenizer)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _rows(pair_files["val"])[:6])
    margins = pair_margins(tmp_path / "with_head", pairs, reference=tiny_model_dir, batch_size=4)
    assert set(margins) == {LOGP, IMPLICIT, REWARD_HEAD}

    lm = with_head.lm.eval()
    for k, row in enumerate(_rows(pairs)):
        chosen, rejected = (_summed_logp(lm, tiny_tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected"))
        assert margins[LOGP][k] == pytest.approx(chosen - rejected, abs=1e-4)
    # The same weights as the reference: every implicit reward difference is 0.
    assert np.abs(margins[IMPLICIT]).max() < 1e-4
    # The reward-head margin is chosen minus rejected, in file order, as `score` writes the rewards.
    scored = score([str(tmp_path / "with_head")], str(pairs), str(tmp_path / "scored.jsonl"), max_length=1024)
    expected = [r["oracle_chosen"] - r["oracle_rejected"] for r in _rows(scored)]
    assert margins[REWARD_HEAD] == pytest.approx(expected, abs=1e-5)

    headless = pair_margins(tiny_model_dir, pairs)
    assert set(headless) == {LOGP} and np.allclose(headless[LOGP], margins[LOGP], atol=1e-5)


def test_relabelling_orders_each_pair_by_its_oracle(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "oracle_chosen": 1.0, "oracle_rejected": 2.0,
             "ensemble_chosen": [1], "ensemble_rejected": [2], "gold_chosen": 0.1, "gold_rejected": 0.3},
            {"prompt": "q", "chosen": "c", "rejected": "d", "oracle_chosen": 3.0, "oracle_rejected": 2.0,
             "ensemble_chosen": [3], "ensemble_rejected": [4], "gold_chosen": 0.5, "gold_rejected": 0.2}]
    out = conditions.relabelled_by_teacher(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    first, second = _rows(out)
    assert (first["chosen"], first["rejected"], first["oracle_chosen"], first["oracle_rejected"]) == ("b", "a", 2.0, 1.0)
    assert (first["ensemble_chosen"], first["gold_chosen"], first["gold_rejected"]) == ([2], 0.3, 0.1)
    assert second == rows[1]


def test_table1_splits_are_equal_sized_and_split_by_confidence_and_distance(tmp_path, pair_files):
    files = conditions.table1_splits(str(pair_files["train"]), tmp_path / "splits")
    halves = {name: _rows(path) for name, path in files.items()}
    sizes = {name: len(rows) for name, rows in halves.items()}
    assert len(set(sizes.values())) == 1 and sizes["easy"] > 0
    confidence = {name: np.mean([r["confidence"] for r in rows]) for name, rows in halves.items()}
    distance = {name: np.mean([r["edit_distance"] for r in rows]) for name, rows in halves.items()}
    assert confidence["easy"] > confidence["sample"] > confidence["hard"]
    assert distance["easy"] > distance["hard"]
    gold = {(r["prompt"], r["chosen"]): abs(r["gold_chosen"] - r["gold_rejected"]) for r in _rows(pair_files["train"])}
    assert all(r["confidence"] == pytest.approx(gold[(r["prompt"], r["chosen"])]) for r in halves["hard"])
    # Seeded: a second call in another folder writes the same pairs.
    again = conditions.table1_splits(str(pair_files["train"]), tmp_path / "again")
    assert all(_rows(again[name]) == halves[name] for name in files)


def test_the_evaluator_reports_kl_to_the_start_next_to_the_rewards(tiny_model_dir, tiny_task, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", tiny_task["eval"][:4])
    settings = EvalSettings(prompts=str(prompts), judges={"gold": "vader"}, temperatures=[0.7, 1.0], max_new_tokens=6,
                            kl_reference=str(tiny_model_dir), keep_prompt_rewards=True)
    measures = Evaluator(settings)(tiny_model_dir)
    # The policy is its own reference: every log-ratio is 0, so is the KL.
    assert measures[KL]["by_temperature"] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert np.array(measures["gold"]["by_prompt"]).shape == (4, 2)
    assert measures["gold"]["mean"] == pytest.approx(np.mean(measures["gold"]["by_prompt"]))


def test_a_condition_names_a_known_split_and_teacher(tiny_model_dir, pair_files):
    bad = {"name": "x", "split": "medium"}
    with pytest.raises(Exception, match="split must be one of"):
        protocol.protocol(conditions=[bad], tuning_condition="x", policy=str(tiny_model_dir),
                          train_data=str(pair_files["train"]), val_data=str(pair_files["val"]))
    for fields, message in (({"name": "x", "teacher": "mine"}, "teacher must be one of"),
                            ({"name": "x", "split": "hard", "teacher": "given"}, "not on a split"),
                            ({"name": "x", "seed": 2}, r"unknown fields \['seed'\]")):
        with pytest.raises(UserError, match=message):
            conditions.as_condition(fields)
    assert conditions.as_condition({"name": "x", "teacher": "all_pairs"}).teacher_key() == "all_pairs"
    assert conditions.as_condition({"name": "x"}).teacher_key() == "x"


BT = {"label_noise": "bt", "noise_temperature": 2.0, "noise_score_columns": ["gold_chosen", "gold_rejected"]}


class _Recorded(Exception):
    """What :class:`_RecordingCells` fails every cell with: the runs are asked for, none is trained."""


def test_an_online_student_learns_from_its_conditions_oracle_and_trains_anew_per_teacher_arm(
        tmp_path, monkeypatch, tiny_model_dir, pair_files):
    """The runs the engine builds (its cells recorded, its teachers stand-ins naming their Oracle)."""
    out = tmp_path / "online"
    asked: dict[tuple[str, str], tuple] = {}  # (condition, method) -> (RunSpec, training key) of seed 0

    class RecordingCells:
        def __init__(self, *args) -> None:
            pass

        def judge(self, *args) -> Future:
            return cells.done({})

        def submit(self, folder, run, families, key) -> Future:
            asked[(folder.relative_to(out).parts[0], folder.name)] = (run, key)
            future: Future = Future()
            future.set_exception(_Recorded())
            return future

    monkeypatch.setattr(protocol, "Cells", RecordingCells)
    monkeypatch.setattr(protocol, "teachers", lambda work, train, val, *rest: {
        "train": train, "val": val, "oracle": f"oracle of {work.name}", "ensemble": []})
    monkeypatch.setattr(protocol, "scored_by", lambda teacher, pairs, scored, options: str(write_jsonl(
        tmp_path / scored.name, [{**r, "oracle_chosen": 1.0, "oracle_rejected": 0.0}
                                 for r in _rows(pairs)])))
    arms = [{"name": "given", "teacher": "given"}, {"name": "bt", "data": BT},
            {"name": "hard_all", "split": "hard", "teacher": "all_pairs"}, {"name": "hard_own", "split": "hard"}]
    run = dict(out=str(out), conditions=arms, methods={"online_dpo": ["online_dpo"], "dpo": ["dpo"]}, seeds=[0],
               learning_rates=None, policy=str(tiny_model_dir), train_data=str(pair_files["train"]),
               val_data=str(pair_files["val"]), given_oracle="shipped oracle", jobs=1)
    with pytest.raises(_Recorded):
        protocol.protocol(**run)

    online = {c: asked[(c, "online_dpo")][0] for c in ("given", "bt", "hard_all", "hard_own")}
    offline = {c: asked[(c, "dpo")][0] for c in online}
    # Each condition's own Oracle judges its online student: the given one, or its teacher set's export.
    assert {c: r.overrides[protocol.ONLINE_JUDGE] for c, r in online.items()} == {
        "given": "shipped oracle", "bt": "oracle of bt", "hard_all": "oracle of all_pairs", "hard_own": "oracle of hard_own"}
    assert not any(protocol.ONLINE_JUDGE in r.overrides for r in offline.values())
    # Its prompts are those of the condition's training pairs (the split's, scored by the arm's teachers).
    assert all(online[c].train_file == offline[c].train_file for c in online)
    assert Path(online["hard_all"].train_file).name == "all_pairs_on_hard.jsonl"
    assert online["given"].train_file == str(pair_files["train"])
    # The label noise reaches it through its Oracle only (noise options flip a file's labels, it reads
    # prompts), and its reference is live (its pairs are sampled as it trains).
    assert offline["bt"].settings()["data.label_noise"] == "bt" and offline["bt"].settings()["model.precompute_reference"]
    assert not any(k.startswith(("data.label_noise", "data.noise")) for k in online["bt"].settings())
    assert "model.precompute_reference" not in online["bt"].settings()
    # DPO reads no scores: one training for both arms of the split. Online DPO reads each arm's Oracle.
    assert asked[("hard_all", "dpo")][1] == asked[("hard_own", "dpo")][1]
    assert asked[("hard_all", "online_dpo")][1] != asked[("hard_own", "online_dpo")][1]
    # Without the Oracle that scored the data, the given condition has no judge for it.
    with pytest.raises(UserError, match=r"\['online_dpo'\] train online.*\['given'\].*--given_oracle"):
        protocol.protocol(**{**run, "given_oracle": None})


PROTOCOLS = {"protocol": ("bt_s2", ["conditions", "splits"]), "compare": ("flip_0.0", ["temperatures"]),
             "robustness": ("flip_0.0", ["across"]), "frontier": ("bt_s2", ["conditions", "splits"]),
             "online": ("bt_s2", ["conditions"])}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_every_configuration_of_the_engine_parses(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["protocol", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    first, views = PROTOCOLS[name]
    assert printed["conditions"][0]["name"] == first and printed["views"] == views
    assert all(conditions.as_condition(c) for c in printed["conditions"])
    if name == "compare":  # tuned over the knobs, on the larger Oracle; judged at the paper's temperatures
        assert printed["grid"]["drdo"]["variant"][0] == "paper" and printed["distill_tolerance"] == 0.1
        assert printed["oracle_shape"]["hidden_size"] == 256 and printed["evaluation"]["temperatures"] == [0.2, 0.5, 0.7, 0.9]
    if name == "robustness":  # no tuning: the recipes' settings
        assert printed["learning_rates"] is None and list(printed["methods"]) == ["drdo", "dpo", "ipo", "edpo"]


@pytest.mark.slow
def test_protocol_at_a_tiny_size(tmp_path, tiny_model_dir, pair_files, eval_file):
    out = tmp_path / "protocol"
    conditions = [{"name": "bt", "data": {"label_noise": "bt", "noise_temperature": 1.0,
                                          "noise_score_columns": ["gold_chosen", "gold_rejected"]}},
                  {"name": "hard_all", "split": "hard", "teacher": "all_pairs", "seeds": 1},
                  {"name": "hard_own", "split": "hard", "seeds": 1}]
    args = [
        "protocol", "--out", str(out), "--conditions", json.dumps(conditions),
        "--methods", json.dumps({"drdo": ["drdo"], "dpo": ["dpo"]}), "--seeds", "[0, 1]",
        "--learning_rates", "[1e-3]", "--max_grid_extensions", "1", "--max_steps", "2", "--judge_steps", "2",
        "--members", "2", "--num_tuning_prompts", "4", "--policy", str(tiny_model_dir),
        "--train_data", str(pair_files["train"]), "--val_data", str(pair_files["val"]),
        "--evaluation.prompts", str(eval_file), "--evaluation.num_prompts", "4", "--evaluation.max_new_tokens", "6",
        "--evaluation.judges", json.dumps({"gold": "vader"}), "--ood_prompts", str(eval_file), "--jobs", "1",
        "--overrides", json.dumps({"data.cache_dir": str(tmp_path / "cache")}),
    ]
    table = main(args)
    # Teachers: held out from their own (noisy) pairs, never the clean validation file.
    oracle_config = next((out / "teachers" / "bt" / "oracle").rglob("config.yaml")).read_text()
    assert "noise_validation: true" in oracle_config and "val_fraction: 0.1" in oracle_config
    assert "label_noise: bt" in oracle_config
    # The split's students distil the all-pairs teachers' scores of the split's pairs.
    assert (out / "teachers" / "all_pairs_on_hard.jsonl").is_file()
    split_pairs = {r["prompt"] + r["chosen"] for r in _rows(out / "splits" / "hard.jsonl")}
    trained = next((out / "hard_all" / "seed_0" / "drdo").rglob("config.yaml")).read_text()
    assert "all_pairs_on_hard.jsonl" in trained
    relabelled = _rows(out / "hard_all" / "relabelled.jsonl")  # once for every seed
    assert {r["prompt"] + r["chosen"] for r in relabelled} <= split_pairs | {r["prompt"] + r["rejected"] for r in _rows(
        out / "splits" / "hard.jsonl")}
    assert all(r["oracle_chosen"] >= r["oracle_rejected"] for r in relabelled)
    # The split's own teachers run as many more epochs as all pairs outnumber the split's.
    scale = len(_rows(pair_files["train"])) / len(_rows(out / "splits" / "hard.jsonl"))
    own_config = next((out / "teachers" / "hard_own" / "oracle").rglob("config.yaml")).read_text()
    assert f"max_epochs: {math.ceil(3 * scale)}" in own_config and scale > 1
    # One grid step past the one-rate grid; every cell of both conditions; the secondary one with 1 seed.
    tuning_md = (out / "tuning.md").read_text()
    assert "drdo: 0.001, 0.003" in tuning_md and "dpo: 0.001, 0.003" in tuning_md and tuning_md.count("| **") == 2
    assert (out / "start" / "tuning" / "scores.json").is_file()  # the diversity floor's reference
    for seed in (0, 1):
        for method in ("drdo", "dpo"):
            scores = json.loads((out / "bt" / f"seed_{seed}" / method / "scores.json").read_text())["scores"]
            assert {"in", "ood", "margins"} <= set(scores) and KL in scores["in"]
    assert not (out / "hard_all" / "seed_1").exists()
    assert {"dpo_relabelled"} <= {p.name for p in (out / "hard_all" / "seed_0").iterdir()}
    for heading in ("## Teachers", "## bt", "## hard_all (secondary: 1 seeds)", "gold win rate vs dpo",
                    "drdo reward head", "dpo implicit reward", "Oracle", "## The splits side by side"):
        assert heading in table
    assert (out / "frontier.png").stat().st_size > 0
    # The tables of what is finished, without training anything: the same, read back from disk.
    (out / "protocol.md").unlink()
    assert main([*args, "--report_only", "true"]) == table and (out / "protocol.md").read_text() == table + "\n"


def test_the_online_configuration_puts_online_methods_beside_the_best_offline_ones(capsys):
    with pytest.raises(SystemExit):
        main(["protocol", "--config", str(ROOT / "configs" / "online.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    # The data's own labels with the Oracle that scored them (the evaluation's judge `oracle` too), and bt_s2.
    assert [(c["name"], c.get("teacher", "own")) for c in printed["conditions"]] == [("bt_s2", "own"), ("data_labels", "given")]
    assert printed["given_oracle"] == printed["evaluation"]["judges"]["oracle"] == "embedded_default/oracle"
    assert printed["evaluation"]["judges"]["gold"] == "vader" and printed["seeds"] == [0, 1, 2]
    methods, grid, traced = printed["methods"], printed["grid"], printed["frontier"]
    online = {"online_drdo": "model.alpha", "online_dpo": "model.beta", "online_ipo": "model.tau"}
    assert {m for m, layers in methods.items() if tuning.trains_online(tuple(layers))} == set(online)
    assert printed["search"] == "coordinates" and printed["tuning_condition"] == "bt_s2"
    # Online: tuned on the learning rate and the knob that sets the distance (the recipe's value first),
    # traced along the learning rate on bt_s2.
    for method, knob in online.items():
        assert list(grid[method]) == [knob] and list(traced[method]) == ["model.learning_rate"]
        assert len(traced[method]["model.learning_rate"]) >= 3
        assert grid[method][knob][0] == tuning.read_config(methods[method][0])["model"]["init_args"][knob.removeprefix("model.")]
    # Offline: the frontier's methods, grids, search and traces, so its cells are these cells.
    with pytest.raises(SystemExit):
        main(["protocol", "--config", str(ROOT / "configs" / "frontier.yaml"), "--print_config"])
    frontier = yaml.safe_load(capsys.readouterr().out)
    offline = set(methods) - set(online)
    assert offline == {"drdo", "drdo_logps", "dpo", "edpo"}
    for key in ("learning_rates", "search", "extend_knobs", "max_grid_extensions", "min_distinct_ratio", "tuning_seed",
                "num_tuning_prompts", "max_steps", "judge_steps", "members", "teacher_selection", "evaluation"):
        assert printed[key] == frontier[key], key
    for method in offline:
        assert (methods[method], grid[method], traced[method]) == (
            frontier["methods"][method], frontier["grid"][method], frontier["frontier"][method]), method
    assert printed["conditions"][0] == frontier["conditions"][0]  # bt_s2, the traced condition of both
    assert printed["frontier_conditions"] == ["bt_s2"] and set(printed["verdict"]) == {"online_drdo"}
    assert set(printed["verdict"]["online_drdo"]) == set(methods) - {"online_drdo"}


@pytest.mark.slow
def test_the_online_configuration_at_a_tiny_size(tmp_path, tiny_model_dir, pair_files, eval_file):
    """configs/online.yaml with two online methods and DPO: each online cell sampled against its
    condition's Oracle, the report with the Oracle's reward beside the gold one and over-optimisation plotted."""
    out = tmp_path / "online"
    args = [
        "protocol", "--config", str(ROOT / "configs" / "online.yaml"), "--out", str(out),
        "--conditions", json.dumps([{"name": "bt", "data": BT}, {"name": "data_labels", "teacher": "given"}]),
        "--methods", json.dumps({"online_drdo": ["online_drdo"], "online_dpo": ["online_dpo"], "dpo": ["dpo"]}),
        "--learning_rates", "null", "--seeds", "[0]", "--frontier_conditions", '["bt"]', "--frontier_seeds", "1",
        "--frontier", json.dumps({"online_drdo": {"model.alpha": [0.01, 1.0]}, "dpo": {"model.beta": [0.03, 3.0]}}),
        "--verdict", json.dumps({"online_drdo": ["online_dpo", "dpo"]}), "--given_oracle", "vader",
        "--max_steps", "2", "--judge_steps", "2", "--members", "1",
        "--policy", str(tiny_model_dir), "--train_data", str(pair_files["train"]), "--val_data", str(pair_files["val"]),
        "--evaluation.prompts", str(eval_file), "--evaluation.num_prompts", "4", "--evaluation.max_new_tokens", "6",
        "--evaluation.temperatures", "[1.0]", "--evaluation.judges", json.dumps({"gold": "vader", "oracle": str(EMBEDDED / "oracle")}),
        "--ood_prompts", "null", "--jobs", "1", "--overrides", json.dumps({"data.cache_dir": str(tmp_path / "cache")}),
    ]
    table = main(args)
    bt_oracle = json.loads((out / "teachers" / "bt" / "teachers.json").read_text())["oracle"]
    for condition, judge in (("bt", bt_oracle), ("data_labels", "vader")):
        for method in ("online_drdo", "online_dpo"):
            trained = yaml.safe_load(next((out / condition / "seed_0" / method).rglob("config.yaml")).read_text())
            assert trained["model"]["init_args"]["online"]["judge"] == judge and trained["data"]["prompts_only"]
    traced = yaml.safe_load(next((out / "bt" / "frontier" / "online_drdo" / "alpha=1.0").rglob("config.yaml")).read_text())
    assert traced["model"]["init_args"]["online"]["judge"] == bt_oracle and traced["model"]["init_args"]["alpha"] == 1.0
    # Every condition's table has the Oracle's reward beside the gold one, for every method.
    heading = "| method | seeds | gold reward | oracle reward | distinct-2 of the generations |"
    assert table.count(heading) == 2
    for condition in ("bt", "data_labels"):
        section = table.split(f"## {condition}")[1]
        assert all(f"| {m} | 1 |" in section for m in ("online_drdo", "online_dpo", "dpo"))
    assert "## Gold against the Oracle's reward along the frontier" in table and "| bt | online_drdo | alpha 0.01 |" in table
    # The verdict: online DPO untraced, at the tuned points; DPO traced beside online DRDO, at equal KL.
    verdict = next(line for line in table.splitlines() if line.startswith("| bt | online_drdo | ")).split("|")
    assert "at the tuned points (KL " in verdict[3] and verdict[4].strip() == "no common KL level"
    assert (out / "overoptimisation.png").read_bytes().startswith(b"\x89PNG")


def test_the_splits_table_puts_each_arms_splits_side_by_side():
    cell = lambda gold: {"scores": {"in": {"gold": {"mean": gold}}}}
    conds = [conditions.as_condition(c) for c in (
        {"name": "bt", "data": {"label_noise": "bt"}}, {"name": "hard_all", "split": "hard", "teacher": "all_pairs"},
        {"name": "easy_all", "split": "easy", "teacher": "all_pairs"}, {"name": "hard_own", "split": "hard"})]
    results = {"bt": {("dpo", 0): cell(9.0)},
               "hard_all": {("dpo", 0): cell(0.2), ("dpo", 1): cell(0.4), ("drdo", 0): cell(0.7)},
               "easy_all": {("dpo", 0): cell(0.5)}, "hard_own": {("drdo", 0): cell(0.1)}}
    summary = protocol_report.summarize(protocol_report.cell_rows(results, [0.7], {}))
    all_pairs, own = protocol_report.splits_table(summary, conds, ["drdo", "dpo"]).split("\n\n")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in all_pairs.splitlines()[2:]}
    assert "hard: hard_all" in all_pairs.splitlines()[0] and "easy: easy_all" in all_pairs.splitlines()[0]
    assert rows["drdo"] == ["+0.700 (1)", "-"]
    assert rows["dpo"][0].startswith("+0.300 [") and rows["dpo"][0].endswith("(2)") and rows["dpo"][1] == "+0.500 (1)"
    assert "own teachers" in own and "+0.100 (1)" in own and "9.0" not in all_pairs + own  # no noise-model condition


def test_a_reward_heads_correlation_with_its_teacher_is_a_measure_of_the_validation_pairs():
    margins = lambda head: {"scores": {"in": {"gold": {"mean": 0.0, "by_temperature": [0.0]}}, "margins": head}}
    results = {"c": {("drdo", 0): margins({"reward_head": [1.0, 2.0, 3.0], "logp": [0.0, 0.0, 1.0]}),
                     ("dpo", 0): margins({"implicit": [3.0, 2.0, 1.0], "logp": [0.0, 0.0, 1.0]})}}
    rows = protocol_report.cell_rows(results, [0.7], {"c": [2.0, 4.0, 6.5]})
    (corr,) = [r for r in rows if r["measure"] == "reward_corr"]
    assert (corr["method"], corr["prompts"]) == ("drdo", "pairs")
    assert corr["value"] == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])
    assert {(r["temperature"], r["value"]) for r in rows if r["method"] == "dpo"} == {("all", 0.0), ("0.7", 0.0)}
