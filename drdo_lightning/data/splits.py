"""The paper's non-deterministic splits (Table 5): pairs split at the median labeler confidence and
edit distance."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from drdo_lightning.data.readers import read_rows
from drdo_lightning.data.tokenization import load_tokenizer
from drdo_lightning.errors import DataError
from drdo_lightning.jsonl import write_jsonl
from drdo_lightning.reports import markdown_table

log = logging.getLogger(__name__)

def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, token in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token != other)))
        previous = current
    return previous[-1]


def normalized_edit_distance(a: Sequence, b: Sequence) -> float:
    """Edit distance divided by the longer length: 0 for equal sequences, 1 for nothing in common."""
    return edit_distance(a, b) / max(len(a), len(b), 1)


def _field(row: dict, dotted: str) -> Any:
    """``row["extra"]["confidence"]`` for ``"extra.confidence"``; None where a part is missing."""
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _tldr_prompt(info: dict) -> str:
    """The TL;DR prompt of an OpenAI comparison's ``info`` (a Reddit post, or a CNN/DM article)."""
    if info.get("post") is not None:
        return f"SUBREDDIT: r/{info.get('subreddit')}\nTITLE: {info.get('title')}\nPOST: {info['post']}\nTL;DR:"
    return f"ARTICLE: {info['article']}\nTL;DR:"


def read_comparisons(
    data: str, *, split: str = "train", prompt_column: str = "prompt", chosen_column: str = "chosen",
    rejected_column: str = "rejected", confidence_column: str | None = None,
) -> list[dict]:
    """``{prompt, chosen, rejected, confidence}`` rows from preference data with a confidence value.

    Two layouts, told apart per row: OpenAI's summarize-from-feedback ``comparisons`` (``info``,
    ``summaries``, ``choice``; confidence in ``extra.confidence``) and flat pairs with a
    confidence column. ``confidence_column`` may be dotted for nested fields; default
    ``extra.confidence`` for comparisons, ``confidence`` for pairs. Rows without a confidence
    are skipped and counted.
    """
    rows, skipped = [], 0
    for number, row in read_rows(data, split):
        if "summaries" in row and "choice" in row:
            texts = [s["text"] for s in row["summaries"]]
            pair = {"prompt": _tldr_prompt(row["info"]), "chosen": texts[row["choice"]], "rejected": texts[1 - row["choice"]]}
            confidence = _field(row, confidence_column or "extra.confidence")
        else:
            pair = {"prompt": row.get(prompt_column), "chosen": row.get(chosen_column), "rejected": row.get(rejected_column)}
            confidence = _field(row, confidence_column or "confidence")
            if not all(isinstance(v, str) for v in pair.values()):
                raise DataError(f"{data}: row {number}: need text in {prompt_column!r}, {chosen_column!r}, {rejected_column!r}")
        if confidence is None:
            skipped += 1
            continue
        rows.append({**pair, "confidence": float(confidence)})
    if skipped:
        log.warning("%s: skipped %d rows without a confidence value", data, skipped)
    if not rows:
        raise DataError(f"{data}: no rows with a confidence value", setting="confidence_column",
                        advice="name the confidence field with {option}")
    return rows


def splits(
    data: str,
    out: str = "runs/splits",
    split: str = "train",
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    confidence_column: str | None = None,
    tokenizer: str | None = None,
) -> dict[str, dict[str, float]]:
    """Split preference pairs into D_hc,he (easy) and D_lc,le (hard), as the paper's Table 5.

    The split is at the 50th percentiles of labeler confidence and of the normalised token edit
    distance between chosen and rejected.

    A pair is *high* on a measure when it lies strictly above that measure's median and *low*
    when strictly below; pairs at a median belong to neither (with integer confidences many
    do). D_hc,he holds pairs high on both (confident labels, clearly different responses: "easy"),
    D_lc,le pairs low on both ("hard", near-ties). Writes ``all.jsonl``, ``hc_he.jsonl``,
    ``lc_le.jsonl`` (prompt, chosen, rejected, confidence, edit_distance: trainable with the data
    module) and ``splits.md`` / ``splits.json`` with sizes, means and the medians.

    Args:
        data: OpenAI ``comparisons`` rows (e.g. the TL;DR comparisons JSON lines) or any
            preference pairs with a confidence column (see :func:`read_comparisons`).
        tokenizer: Tokenizer for the edit distance (path or hub id); default: whitespace words.
    """
    rows = read_comparisons(data, split=split, prompt_column=prompt_column, chosen_column=chosen_column,
                            rejected_column=rejected_column, confidence_column=confidence_column)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None

    def tokens(texts: list[str]) -> list[list]:
        return [t.split() for t in texts] if tok is None else tok(texts, add_special_tokens=False)["input_ids"]

    chosen, rejected = tokens([r["chosen"] for r in rows]), tokens([r["rejected"] for r in rows])
    for row, a, b in tqdm(zip(rows, chosen, rejected), total=len(rows), desc="edit distance", unit="pair"):
        row["edit_distance"] = normalized_edit_distance(a, b)
    confidence = np.array([r["confidence"] for r in rows])
    distance = np.array([r["edit_distance"] for r in rows])
    medians = {"confidence": float(np.percentile(confidence, 50)), "edit_distance": float(np.percentile(distance, 50))}
    members = {
        "all": np.ones(len(rows), dtype=bool),
        "hc_he": (confidence > medians["confidence"]) & (distance > medians["edit_distance"]),
        "lc_le": (confidence < medians["confidence"]) & (distance < medians["edit_distance"]),
    }
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, mask in members.items():
        chosen_rows = [r for r, keep in zip(rows, mask) if keep]
        write_jsonl(root / f"{name}.jsonl", chosen_rows)
        report[name] = {"size": len(chosen_rows),
                        "mean_confidence": float(confidence[mask].mean()) if mask.any() else math.nan,
                        "mean_edit_distance": float(distance[mask].mean()) if mask.any() else math.nan}
    (root / "splits.json").write_text(json.dumps({"medians": medians, "splits": report}, indent=1))
    table = "\n".join([
        f"Medians: confidence {medians['confidence']:g}, normalised edit distance {medians['edit_distance']:.3f}", "",
        markdown_table(["split", "size", "mean confidence", "mean edit distance"],
                       [[name, str(r["size"]), f"{r['mean_confidence']:.3f}", f"{r['mean_edit_distance']:.3f}"]
                        for name, r in report.items()]),
    ])
    (root / "splits.md").write_text(table + "\n")
    print(table)
    return report
