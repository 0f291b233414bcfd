"""Validating rows into pairs: conversations and their chat rendering, bad input named by file, row and
field, label flipping."""

from __future__ import annotations

import json
import logging
import re

import pytest
from data_support import (  # noqa: F401 (fixtures)
    QUESTIONS,
    SCORES,
    TEMPLATE,
    as_tuples,
    make_dm,
    rows,
    setup_dm,
    tok,
    trl_rows,
    ultrafeedback_rows,
)

from drdo_lightning.data.collation import PairCollator
from drdo_lightning.data.pairs import Columns, extract_prompt
from drdo_lightning.data.tokenization import IGNORE_INDEX
from drdo_lightning.errors import DataError
from drdo_lightning.jsonl import write_jsonl

# --- 3. conversational rows --------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["ultrafeedback", "trl"])
def test_conversational_rows(layout, tmp_path, tiny_model_dir, tok):
    data = ultrafeedback_rows() if layout == "ultrafeedback" else trl_rows()
    dm = setup_dm(write_jsonl(tmp_path / "conv.jsonl", data), tiny_model_dir, chat_template=TEMPLATE, batch_size=2)
    assert len(dm.train_dataset) == len(QUESTIONS)
    for ex, (q, good, bad) in zip(dm.train_dataset, QUESTIONS):
        # The template writes no BOS; the module must not add one (nor an EOS after the turn).
        assert tok.decode(ex["prompt_ids"]) == f"<|user|>{q}\n<|assistant|>"
        assert tok.decode(ex["chosen_ids"]) == good + "\n"
        assert tok.decode(ex["rejected_ids"]) == bad + "\n"
        assert tok.bos_token_id not in ex["prompt_ids"] and tok.eos_token_id not in ex["chosen_ids"]
    assert dm.tokenizer.pad_token_id is not None
    batch = PairCollator(dm.tokenizer.pad_token_id)(list(dm.train_dataset))
    for k in ("chosen", "rejected"):
        for row, ex in enumerate(dm.train_dataset):
            p, r = ex["prompt_ids"], ex[f"{k}_ids"]
            labels = batch[f"{k}_labels"][row]
            covered = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
            assert covered == list(range(len(p), len(p) + len(r)))
            assert labels[covered].tolist() == r
            assert batch[f"{k}_input_ids"][row, : len(p) + len(r)].tolist() == p + r


def test_conversational_layouts_agree_and_multi_turn(tmp_path, tiny_model_dir, tok):
    uf = setup_dm(write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows()), tiny_model_dir, chat_template=TEMPLATE)
    trl = setup_dm(write_jsonl(tmp_path / "trl.jsonl", trl_rows()), tiny_model_dir, chat_template=TEMPLATE)
    assert as_tuples(uf.train_dataset) == as_tuples(trl.train_dataset)

    history = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
    ]
    row = {"prompt": history, "chosen": [{"role": "assistant", "content": "Bye."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    dm = setup_dm(write_jsonl(tmp_path / "multi.jsonl", [row]), tiny_model_dir, chat_template=str(template_file))
    ex = dm.train_dataset[0]
    assert tok.decode(ex["prompt_ids"]) == "<|system|>Be brief.\n<|user|>Hi.\n<|assistant|>Hello.\n<|user|>Bye?\n<|assistant|>"
    assert tok.decode(ex["chosen_ids"]) == "Bye.\n" and tok.decode(ex["rejected_ids"]) == "No.\n"


def test_conversational_rows_need_a_chat_template(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "conv.jsonl", ultrafeedback_rows())
    with pytest.raises(DataError, match=r"row 1: .*chat_template"):
        setup_dm(path, tiny_model_dir)


def _conv_error(tmp_path, tiny_model_dir, bad_row, name="conv.jsonl"):
    path = write_jsonl(tmp_path / name, ultrafeedback_rows() + [bad_row])
    with pytest.raises(DataError) as e:
        setup_dm(path, tiny_model_dir, chat_template=TEMPLATE)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg
    return msg


def test_conversational_role_errors(tmp_path, tiny_model_dir):
    good = ultrafeedback_rows()[0]
    last_user = dict(good, chosen=good["chosen"][:1])  # the "chosen" conversation ends with the user
    msg = _conv_error(tmp_path, tiny_model_dir, last_user)
    assert "field 'chosen'" in msg and "role 'assistant'" in msg
    other_context = dict(good, rejected=[{"role": "user", "content": "Something else?"}, good["rejected"][1]])
    msg = _conv_error(tmp_path, tiny_model_dir, other_context)
    assert "field 'rejected'" in msg and "differ" in msg
    prompt_ends_with_assistant = dict(
        trl_rows()[0], prompt=[{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hey."}]
    )
    msg = _conv_error(tmp_path, tiny_model_dir, prompt_ends_with_assistant)
    assert "field 'prompt'" in msg and "assistant" in msg
    not_messages = dict(good, rejected=[{"role": "user"}, {"role": "assistant", "content": "x"}])
    assert "field 'rejected'" in _conv_error(tmp_path, tiny_model_dir, not_messages)


@pytest.mark.parametrize("value", [None, []])
def test_conversational_missing_rejected_is_an_error(value, tmp_path, tiny_model_dir):
    good = ultrafeedback_rows()[0]
    msg = _conv_error(tmp_path, tiny_model_dir, dict(good, rejected=value))
    assert "field 'rejected'" in msg



# --- 3b. implicit prompts, and the layouts docs/data.md lists ----------------------------------

HH = "\n\nHuman: {q}\n\nAssistant: {a}"
UF_SCORES = dict(chosen_score_column="score_chosen", rejected_score_column="score_rejected")


def _layout(layout: str) -> tuple[list[dict], dict, list[tuple[str, str, str]]]:
    """Rows of ``QUESTIONS`` in ``layout`` (a row of the table "Layouts you can bring"), the data
    options it needs, and the (prompt, chosen, rejected) texts each row must give."""
    chat = [(f"<|user|>{q}\n<|assistant|>", good + "\n", bad + "\n") for q, good, bad in QUESTIONS]
    if layout == "trl standard":
        return [{"prompt": q, "chosen": g, "rejected": b} for q, g, b in QUESTIONS], {}, list(QUESTIONS)
    if layout == "trl conversational":
        return trl_rows(), {}, chat
    if layout == "trl implicit conversational":
        return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in ultrafeedback_rows()], {"prompt_column": None}, chat
    if layout == "trl implicit text":
        rows = [{"chosen": f"Q: {q} A: {g}", "rejected": f"Q: {q} A: {b}"} for q, g, b in QUESTIONS]
        # The shared "It is f" is cut back to the last whole word; the responses keep their space.
        return rows, {"prompt_column": None}, [
            ("Q: What is two plus two? A: It is", " four.", " five."),
            ("Q: Name a colour. A:", " Blue is one.", " A chair."),
        ]
    if layout == "anthropic hh":
        rows = [{"chosen": HH.format(q=q, a=g), "rejected": HH.format(q=q, a=b)} for q, g, b in QUESTIONS]
        # The responses share " It is f", yet the prompt ends at the shared "Assistant:".
        return rows, {"prompt_column": None}, [(HH.format(q=q, a="")[:-1], " " + g, " " + b) for q, g, b in QUESTIONS]
    assert layout == "ultrafeedback binarized"
    rows = [
        dict(r, prompt_id=str(i), messages=r["chosen"], score_chosen=8.0, score_rejected=3.5)
        for i, r in enumerate(ultrafeedback_rows())
    ]
    return rows, UF_SCORES, chat


LAYOUTS = ["trl standard", "trl conversational", "trl implicit conversational", "trl implicit text", "anthropic hh",
           "ultrafeedback binarized"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_you_can_bring(layout, tmp_path, tiny_model_dir, tok):
    layout_rows, options, expected = _layout(layout)
    dm = setup_dm(write_jsonl(tmp_path / "d.jsonl", layout_rows), tiny_model_dir, chat_template=TEMPLATE, **options)
    for ex, texts in zip(dm.train_dataset, expected, strict=True):
        decoded = tuple(tok.decode(ex[f"{k}_ids"], skip_special_tokens=True) for k in ("prompt", "chosen", "rejected"))
        assert decoded == texts
        if options is UF_SCORES:
            assert (ex["chosen_score"], ex["rejected_score"]) == (8.0, 3.5)


def test_implicit_text_prompts_tokenize_as_explicit_ones(tmp_path, tiny_model_dir):
    for layout in ("trl implicit text", "anthropic hh"):
        implicit_rows, options, expected = _layout(layout)
        implicit = setup_dm(write_jsonl(tmp_path / "implicit.jsonl", implicit_rows), tiny_model_dir, **options)
        explicit_rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in expected]
        explicit = setup_dm(write_jsonl(tmp_path / "explicit.jsonl", explicit_rows), tiny_model_dir)
        assert as_tuples(implicit.train_dataset) == as_tuples(explicit.train_dataset)


IMPLICIT = Columns(None, "chosen", "rejected")
USER, ASSISTANT = ({"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."})


@pytest.mark.parametrize("chosen,rejected,expected", [
    ("Say:\n\nyes", "Say:\n\nno", ("Say:", "\n\nyes", "\n\nno")),  # the whole run of whitespace starts the responses
    ("Hello world", "Hello world, again", ("Hello", " world", " world, again")),
    (HH.format(q="Hi.", a="Hello.") + HH.format(q="Help?", a="I can."),
     HH.format(q="Hi.", a="Hello.") + HH.format(q="Help?", a="I cannot."),
     (HH.format(q="Hi.", a="Hello.") + HH.format(q="Help?", a="")[:-1], " I can.", " I cannot.")),
    ([USER, ASSISTANT, {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}],
     [USER, ASSISTANT, {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "No."}],
     ([USER, ASSISTANT, {"role": "user", "content": "Bye?"}], [{"role": "assistant", "content": "Bye."}],
      [{"role": "assistant", "content": "No."}])),
    ([USER, ASSISTANT], [USER, ASSISTANT], ([USER], [ASSISTANT], [ASSISTANT])),  # identical: left to the identical check
])
def test_extract_prompt_rule(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected, IMPLICIT) == expected


def test_implicit_prompt_rows_without_a_shared_beginning(tmp_path, tiny_model_dir, caplog):
    good, options, _ = _layout("trl implicit text")
    other_question = [{"role": "user", "content": "Other?"}, ultrafeedback_rows()[0]["rejected"][1]]
    bad = [
        {"chosen": "Yes.", "rejected": "No."},  # nothing shared
        {"chosen": "Yes, sure.", "rejected": "Yesterday."},  # shared "Yes", not a whole word
        {"chosen": "It is.", "rejected": "It is."},  # identical
        {"chosen": ultrafeedback_rows()[0]["chosen"], "rejected": other_question},
    ]
    expect = [("'rejected'", "share no beginning"), ("'rejected'", "share no beginning"),
              ("'rejected'", "identical"), ("'rejected'", "share no beginning")]
    for i, (row, (field, words)) in enumerate(zip(bad, expect)):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", good + [row])
        with pytest.raises(DataError) as e:
            setup_dm(path, tiny_model_dir, chat_template=TEMPLATE, **options)
        msg = str(e.value)
        assert str(path) in msg and "row 3" in msg and f"field {field}" in msg and words in msg, msg
    caplog.set_level(logging.WARNING, logger="drdo_lightning.data")
    path = write_jsonl(tmp_path / "mixed.jsonl", good + bad)
    dm = setup_dm(path, tiny_model_dir, chat_template=TEMPLATE, on_bad_row="skip", **options)
    assert len(dm.train_dataset) == len(good)
    (warning,) = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert warning.args[1:] == (4, {"no_shared_prompt": 3, "identical_responses": 1})


def test_missing_prompt_column_suggests_prompt_column_null(tmp_path, tiny_model_dir):
    for layout in ("trl implicit conversational", "trl implicit text", "anthropic hh"):
        path = write_jsonl(tmp_path / "implicit.jsonl", _layout(layout)[0])
        with pytest.raises(DataError) as e:
            setup_dm(path, tiny_model_dir, chat_template=TEMPLATE)
        assert "missing column(s) ['prompt']" in str(e.value)
        assert e.value.setting == "prompt_column"
        assert "(--data.prompt_column null takes what they share as the prompt)" in e.value.for_option("--data.prompt_column")
    unrelated = write_jsonl(tmp_path / "unrelated.jsonl", [{"chosen": "Yes.", "rejected": "No."}])
    with pytest.raises(DataError) as e:
        setup_dm(unrelated, tiny_model_dir)
    assert "missing column(s) ['prompt']" in str(e.value) and e.value.setting is None


def test_implicit_prompts_need_rejected_responses(pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match="rejected_column"):
        make_dm(pair_files["sft"], tiny_model_dir, prompt_column=None, rejected_column=None)


# --- 5. label flipping -------------------------------------------------------------------------


def _flipped(base, flipped) -> list[int]:
    out = []
    for i, (a, b) in enumerate(zip(base, flipped)):
        assert a["prompt_ids"] == b["prompt_ids"]
        if a["chosen_ids"] != b["chosen_ids"]:
            assert (b["chosen_ids"], b["rejected_ids"]) == (a["rejected_ids"], a["chosen_ids"])
            assert (b["chosen_score"], b["rejected_score"]) == (a["rejected_score"], a["chosen_score"])
            out.append(i)
        else:
            assert b == a
    return out


def test_label_flipping(pair_files, tiny_task, tiny_model_dir):
    kw = dict(val_file=str(pair_files["val"]), **SCORES)
    base = setup_dm(pair_files["train"], tiny_model_dir, **kw)
    a = setup_dm(pair_files["train"], tiny_model_dir, label_flip_rate=0.25, seed=0, **kw)
    b = setup_dm(pair_files["train"], tiny_model_dir, label_flip_rate=0.25, seed=0, **kw)
    c = setup_dm(pair_files["train"], tiny_model_dir, label_flip_rate=0.25, seed=1, **kw)
    n = len(tiny_task["train"])
    flips_a, flips_b, flips_c = (_flipped(base.train_dataset, dm.train_dataset) for dm in (a, b, c))
    assert len(flips_a) == len(flips_c) == round(0.25 * n) == 24
    assert flips_a == flips_b and flips_a != flips_c
    for dm in (a, b, c):
        assert as_tuples(dm.val_dataset) == as_tuples(base.val_dataset)  # validation never flipped


def test_label_flipping_with_val_fraction_spares_validation(pair_files, tiny_model_dir):
    kw = dict(val_fraction=0.25, seed=3, **SCORES)
    base = setup_dm(pair_files["train"], tiny_model_dir, **kw)
    flipped = setup_dm(pair_files["train"], tiny_model_dir, label_flip_rate=0.5, **kw)
    assert as_tuples(flipped.val_dataset) == as_tuples(base.val_dataset)
    assert len(_flipped(base.train_dataset, flipped.train_dataset)) == round(0.5 * len(base.train_dataset))


def test_label_flipping_rejects_bad_settings(pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match="label_flip_rate"):
        make_dm(pair_files["train"], tiny_model_dir, label_flip_rate=1.5)
    with pytest.raises(ValueError, match="needs preference pairs"):
        setup_dm(pair_files["sft"], tiny_model_dir, rejected_column=None, label_flip_rate=0.1)



# --- 9. bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "missing.csv", "missing.parquet", "a/b/missing"])
def test_missing_file(name, tmp_path, tiny_model_dir, pair_files):
    path = tmp_path / name
    with pytest.raises(FileNotFoundError, match="missing"):
        setup_dm(path, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="missing"):
        setup_dm(pair_files["train"], tiny_model_dir, val_file=str(path))


def test_malformed_json(rows, tmp_path, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + '{"prompt": "x", "chosen": \n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: malformed JSON")):
        setup_dm(path, tiny_model_dir)
    path.write_text(json.dumps(rows[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 2: expected a JSON object")):
        setup_dm(path, tiny_model_dir)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows[:2])[:-5])
    with pytest.raises(DataError, match=re.escape(f"{path}: malformed JSON")):
        setup_dm(path, tiny_model_dir)
    path.write_text(json.dumps({"rows": rows[:2]}))
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        setup_dm(path, tiny_model_dir)


def test_missing_score_column(pair_files, tiny_model_dir):
    with pytest.raises(DataError) as e:
        setup_dm(pair_files["train"], tiny_model_dir, chosen_score_column="reward_a", rejected_score_column="reward_b")
    msg = str(e.value)
    assert "missing column(s) ['reward_a', 'reward_b']" in msg and "'gold_chosen'" in msg and "'prompt'" in msg


BAD_VALUES = [
    ("prompt", None, "null"),
    ("prompt", "", "empty"),
    ("prompt", "   ", "empty"),
    ("chosen", 5, "got int"),
    ("chosen", {"text": "x"}, "got dict"),
    ("rejected", ["x"], "got list"),
    ("rejected", "SAME", "identical"),
    ("oracle_chosen", "abc", "got the text 'abc'"),
    ("oracle_chosen", "0.5", "got the text '0.5' (a score must be stored as a number)"),  # not guessed from text
    ("oracle_chosen", float("nan"), "finite number"),  # json.dumps writes NaN, which json.loads accepts
    ("oracle_rejected", float("inf"), "finite number"),
    ("oracle_rejected", None, "finite number"),
    ("oracle_rejected", True, "finite number"),
    ("oracle_chosen", [], "non-empty list"),
    ("oracle_chosen", [0.1, "x"], "got the text 'x'"),
]


@pytest.mark.parametrize("field,value,expect", BAD_VALUES)
def test_bad_field_values_name_file_row_and_field(field, value, expect, rows, tmp_path, tiny_model_dir):
    bad = [dict(r) for r in rows[:4]]
    if value == "SAME":
        value = bad[2]["chosen"]
    bad[2][field] = value
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    if isinstance(value, float) and value != value:
        assert "NaN" in path.read_text()  # not valid JSON, but Python's json reads it
    with pytest.raises(DataError) as e:
        setup_dm(path, tiny_model_dir, **SCORES)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg and f"field {field!r}" in msg and expect in msg
    assert "on_bad_row skip" in msg


def test_skip_bad_rows(rows, tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    good = [dict(r) for r in rows[:6]]
    bad = [
        dict(rows[6], prompt=None),
        dict(rows[7], chosen=""),
        dict(rows[8], rejected=rows[8]["chosen"]),
        dict(rows[9], oracle_chosen=float("nan")),
        dict(rows[10], oracle_rejected="n/a"),
        dict(rows[11], chosen=7),
    ]
    mixed = [good[0], bad[0], good[1], good[2], bad[1], bad[2], good[3], bad[3], bad[4], good[4], bad[5], good[5]]
    path = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    dm = setup_dm(path, tiny_model_dir, on_bad_row="skip", **SCORES)
    reference = setup_dm(write_jsonl(tmp_path / "good.jsonl", good), tiny_model_dir, **SCORES)
    assert as_tuples(dm.train_dataset) == as_tuples(reference.train_dataset)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert warnings[0].args[1] == 6
    assert warnings[0].args[2] == {
        "null_field": 1, "empty_field": 1, "identical_responses": 1, "bad_score": 2, "not_a_string": 1
    }
    with pytest.raises(DataError, match="no usable rows"):
        setup_dm(write_jsonl(tmp_path / "allbad.jsonl", bad), tiny_model_dir, on_bad_row="skip", **SCORES)


def test_sft_mode(pair_files, tiny_task, tiny_model_dir, tok):
    dm = setup_dm(pair_files["sft"], tiny_model_dir, rejected_column=None, val_fraction=0.25, batch_size=4)
    ex = dm.train_dataset[0]
    assert set(ex) == {"prompt_ids", "chosen_ids"}
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(tiny_task["sft"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"chosen_input_ids", "chosen_attention_mask", "chosen_labels"}
    first = setup_dm(pair_files["sft"], tiny_model_dir, rejected_column=None).train_dataset[0]
    row = tiny_task["sft"][0]
    assert first["prompt_ids"] == tok(row["prompt"])["input_ids"]
    assert first["chosen_ids"] == tok(row["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
