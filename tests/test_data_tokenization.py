"""Tokenization: the truncation rule's exact ids, drops, and tokenizers as they come (no pad token, no
BOS, a chat template with its own BOS)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from data_support import TEMPLATE, data_counts, make_dm, reference_pair, rows, setup_dm, tok, trl_rows  # noqa: F401 (fixtures)
from transformers import AutoTokenizer

from drdo_lightning.data.tokenization import IGNORE_INDEX
from drdo_lightning.errors import DataError
from drdo_lightning.jsonl import write_jsonl

# --- 4. truncation -----------------------------------------------------------------------------


def test_truncation_rule_exact_ids(pair_files, tiny_task, tiny_model_dir, tok, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    mpl, ml = 28, 70  # some prompts and some responses fit, others do not
    dm = setup_dm(pair_files["train"], tiny_model_dir, max_prompt_length=mpl, max_length=ml)
    expected = Counter()
    for ex, row in zip(dm.train_dataset, tiny_task["train"]):
        full_prompt = tok(row["prompt"])["input_ids"]
        prompt, (chosen, rejected), fits = reference_pair(tok, row, mpl, ml)
        assert ex["prompt_ids"] == prompt and ex["chosen_ids"] == chosen and ex["rejected_ids"] == rejected
        if len(full_prompt) > mpl:
            expected["prompt_truncated"] += 1
            # BOS, then the prompt's *last* tokens.
            assert ex["prompt_ids"] == [tok.bos_token_id] + full_prompt[-(mpl - 1):]
        if not fits:
            expected["response_truncated"] += 1
            # Responses keep their *first* tokens: the EOS at the end is cut.
            for k in ("chosen", "rejected"):
                raw = tok(row[k], add_special_tokens=False)["input_ids"]
                if len(raw) + 1 > ml - len(prompt):
                    assert ex[f"{k}_ids"] == raw[: ml - len(prompt)]
                    assert len(ex["prompt_ids"]) + len(ex[f"{k}_ids"]) == ml
        assert len(ex["prompt_ids"]) <= mpl
        assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) <= ml
    n = len(tiny_task["train"])
    assert 0 < expected["prompt_truncated"] < n and 0 < expected["response_truncated"] < n
    assert data_counts(caplog) == dict(expected)


def test_drop_long_drops_exactly_the_pairs_that_do_not_fit(pair_files, tiny_task, tiny_model_dir, tok, caplog):
    caplog.set_level(logging.INFO, logger="drdo_lightning.data")
    mpl, ml = 24, 90
    dm = setup_dm(pair_files["train"], tiny_model_dir, max_prompt_length=mpl, max_length=ml, drop_long=True)
    kept = []
    for row in tiny_task["train"]:
        prompt, (chosen, rejected), fits = reference_pair(tok, row, mpl, ml)
        if fits:
            kept.append((prompt, chosen, rejected))
    n_dropped = len(tiny_task["train"]) - len(kept)
    assert 0 < n_dropped < len(tiny_task["train"])
    assert [(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) for ex in dm.train_dataset] == kept
    assert all(ex["chosen_ids"][-1] == tok.eos_token_id for ex in dm.train_dataset)  # nothing cut
    assert data_counts(caplog)["dropped_too_long"] == n_dropped
    assert "response_truncated" not in data_counts(caplog)


def test_everything_dropped_is_an_error(pair_files, tiny_model_dir):
    with pytest.raises(DataError, match="train split is empty after filtering"):
        setup_dm(pair_files["train"], tiny_model_dir, max_prompt_length=2, max_length=4, drop_long=True)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("drdo_lightning")]


def test_what_loading_lost_or_changed_is_a_warning_in_plain_words(pair_files, tiny_task, tiny_model_dir, caplog):
    caplog.set_level(logging.WARNING, logger="drdo_lightning.data")  # what the command line shows
    n, n_val = len(tiny_task["train"]), len(tiny_task["val"])
    setup_dm(pair_files["train"], tiny_model_dir, val_file=str(pair_files["val"]), max_prompt_length=8, max_length=72,
             label_flip_rate=0.25)
    train, val = data_counts(caplog), data_counts(caplog, "val")  # the record keeps its shape
    assert train["prompt_truncated"] and train["response_truncated"] and val["prompt_truncated"]
    flips = (f"label noise: swapped chosen and rejected (and their scores) in {round(0.25 * n)} of {n} training pairs "
             "(label_flip_rate 0.25, seed 0)")

    def truncated(split: str, total: int, counts: dict) -> str:
        return (f"{split} split: {counts['prompt_truncated']} of {total} prompts truncated to max_prompt_length 8 (their "
                f"first tokens dropped), {counts['response_truncated']} of {total} pairs with responses truncated to fit "
                f"max_length 72 (their last tokens dropped; drop_long drops such pairs instead); {total} pairs kept; "
                f"counts {counts}")

    assert _warnings(caplog) == [flips, truncated("train", n, train), truncated("val", n_val, val)]
    caplog.clear()
    setup_dm(pair_files["train"], tiny_model_dir, max_prompt_length=24, max_length=90, drop_long=True)
    dropped = data_counts(caplog)["dropped_too_long"]
    (message,) = _warnings(caplog)
    assert f"{dropped} of {n} pairs dropped by drop_long (prompt and response did not fit max_length 90)" in message
    assert message.endswith(f"; {n - dropped} pairs kept; counts {data_counts(caplog)}")
    caplog.clear()
    setup_dm(pair_files["train"], tiny_model_dir)  # nothing lost: nothing to warn of
    assert _warnings(caplog) == []


def test_transformers_does_not_warn_of_sequences_we_truncate_ourselves(pair_files, tiny_model_dir, tmp_path, monkeypatch,
                                                                        caplog):
    AutoTokenizer.from_pretrained(str(tiny_model_dir), model_max_length=16).save_pretrained(tmp_path / "short")
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    caplog.set_level(logging.WARNING)
    dm = setup_dm(pair_files["train"], tiny_model_dir, tokenizer=str(tmp_path / "short"), max_prompt_length=8,
                  max_length=16)
    assert not [r for r in caplog.records if "Token indices sequence length" in r.getMessage()]
    dm.tokenizer(" ".join(["word"] * 40))  # other calls of the same tokenizer still hear of it
    assert [r for r in caplog.records if "Token indices sequence length" in r.getMessage()]


@pytest.mark.parametrize("mpl,ml", [(16, 16), (32, 16), (0, 16)])
def test_bad_length_budgets(mpl, ml, pair_files, tiny_model_dir):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        make_dm(pair_files["train"], tiny_model_dir, max_prompt_length=mpl, max_length=ml)



# --- 10. tokenizer without a pad token ---------------------------------------------------------


def test_tokenizer_without_pad_token(pair_files, tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "nopad")).pad_token_id is None
    dm = setup_dm(pair_files["train"], tiny_model_dir, tokenizer=str(tmp_path / "nopad"), val_file=str(pair_files["val"]),
                  eval_batch_size=6)
    eos = dm.tokenizer.eos_token_id
    assert dm.tokenizer.pad_token_id == eos and eos is not None
    batch = next(iter(dm.val_dataloader()))
    mask, ids, labels = batch["chosen_attention_mask"], batch["chosen_input_ids"], batch["chosen_labels"]
    assert (mask == 0).any()
    assert (ids[mask == 0] == eos).all() and (labels[mask == 0] == IGNORE_INDEX).all()
    # The real EOS that ends each response stays a label; only padding is masked.
    lengths = mask.sum(1)
    for row in range(ids.shape[0]):
        assert labels[row, lengths[row] - 1].item() == eos


# --- 11. tokenizers as they come --------------------------------------------------------------


def test_tokenizer_without_bos_adds_no_prefix_and_truncates_from_the_left(pair_files, tiny_task, tiny_model_dir, tmp_path):
    """Qwen's tokenizers have no BOS: nothing is prepended and truncation keeps the prompt's end."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    backend = tok.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, pad_token=tok.pad_token)
    no_bos.save_pretrained(tmp_path / "no_bos")
    dm = setup_dm(pair_files["train"], tiny_model_dir, tokenizer=str(tmp_path / "no_bos"), max_prompt_length=4)
    assert dm.tokenizer.bos_token_id is None
    for ex, row in zip(dm.train_dataset, tiny_task["train"]):
        full = no_bos(row["prompt"], add_special_tokens=True)["input_ids"]
        assert ex["prompt_ids"] == full[-4:]
        assert tok.bos_token_id not in ex["prompt_ids"]


def test_chat_template_with_its_own_bos_gets_no_second_one(tmp_path, tiny_model_dir, tok):
    rows = trl_rows()
    dm = setup_dm(write_jsonl(tmp_path / "conv.jsonl", rows), tiny_model_dir, chat_template="{{ bos_token }}" + TEMPLATE)
    for ex in dm.train_dataset:
        assert ex["prompt_ids"][0] == tok.bos_token_id and ex["prompt_ids"].count(tok.bos_token_id) == 1
        assert tok.bos_token_id not in ex["chosen_ids"] + ex["rejected_ids"]


def test_prompts_ending_in_whitespace_are_counted_in_a_warning(rows, tmp_path, tiny_model_dir, caplog):
    spaced = [dict(r, prompt=r["prompt"] + " ") if i < 3 else r for i, r in enumerate(rows)]
    with caplog.at_level(logging.WARNING, logger="drdo_lightning.data"):
        setup_dm(write_jsonl(tmp_path / "spaced.jsonl", spaced), tiny_model_dir)
    (message,) = [r.getMessage() for r in caplog.records if "whitespace" in r.getMessage()]
    assert message.startswith(f"3 of {len(rows)} prompts end in whitespace")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drdo_lightning.data"):
        setup_dm(write_jsonl(tmp_path / "clean.jsonl", rows), tiny_model_dir)
    assert not [r for r in caplog.records if "whitespace" in r.getMessage()]
