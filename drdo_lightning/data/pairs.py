"""Validating rows into prompt/response texts: fields, scores, prompts taken from what chosen and
rejected share (:func:`extract_prompt`), conversations rendered with a chat template, and swapping a
pair's labels (which pairs: :mod:`.noise`)."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence, TypeVar

from drdo_lightning.data.readers import holds_text_only, read_rows
from drdo_lightning.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")
HH_ASSISTANT = "\n\nAssistant:"  # in Anthropic HH transcripts, what opens each assistant turn


@dataclass
class Columns:
    """The columns of a row; ``prompt=None``: there is none, the prompt is what chosen and rejected
    begin with (:func:`extract_prompt`)."""

    prompt: str | None = "prompt"
    chosen: str = "chosen"
    rejected: str | None = "rejected"
    chosen_score: str | None = None
    rejected_score: str | None = None
    # The pair's margin (chosen minus rejected) that a margin-based label-noise model reads: a
    # column holding it, or two columns (chosen's score, rejected's score) it is the difference of.
    margin: str | tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.prompt is None and self.rejected is None:
            raise ValueError("prompt_column=None takes the prompt from what chosen and rejected share: it needs rejected_column")
        if isinstance(self.margin, list):
            self.margin = tuple(self.margin)
        if isinstance(self.margin, tuple) and len(self.margin) != 2:
            raise ValueError(f"a margin from score columns takes two of them (chosen, rejected), got {list(self.margin)}")

    @property
    def margin_columns(self) -> list[str]:
        """The columns the margin is read from (none when there is no margin)."""
        if self.margin is None:
            return []
        return [self.margin] if isinstance(self.margin, str) else list(self.margin)

    @property
    def prompt_field(self) -> str:
        """The field a bad prompt is named by: the prompt column, or chosen when the prompt comes from it."""
        return self.prompt or self.chosen

    def required(self) -> list[str]:
        names = [self.prompt, self.chosen, self.rejected, self.chosen_score, self.rejected_score, *self.margin_columns]
        return list(dict.fromkeys(n for n in names if n is not None))


@dataclass
class TextPair:
    """One validated row: the rendered prompt and responses, and the Oracle scores."""

    prompt: str
    chosen: str
    rejected: str | None
    chosen_score: float | list[float] | None
    rejected_score: float | list[float] | None
    prompt_has_special_tokens: bool  # rendered by a chat template, which writes its own BOS/EOS
    margin: float | None = None  # chosen minus rejected, from Columns.margin (for margin-based label noise)


class RowError(Exception):
    """A problem with one row: ``reason`` is a short key for skip counts."""

    def __init__(self, field: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.field, self.reason = field, reason


def check_messages(value: Any, field: str) -> list[dict]:
    """A conversation: a non-empty list of ``{'role': str, 'content': str}``; raises :class:`RowError`."""
    if not value or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise RowError(field, "bad_messages", "expected a non-empty list of {'role': str, 'content': str} messages")
    return value


def _check_text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(field, "null_field", "expected a non-empty string, got null")
    if not isinstance(value, str):
        raise RowError(field, "not_a_string", f"expected a non-empty string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "empty_field", "expected a non-empty string, got an empty one")
    return value


def _check_score(value: Any, field: str, from_text: bool = False) -> float | list[float]:
    """A finite float, or a non-empty list of them (one per ensemble member). Text such as ``"0.5"``
    is read as a number only ``from_text`` (a CSV file, which holds every value as text); elsewhere
    a score stored as text is a mistake in the data, not a number to guess."""
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, str) and not from_text:
            raise RowError(field, "bad_score", f"expected a number, got the text {v!r} (a score must be stored as a number)")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RowError(field, "bad_score", f"expected a finite number, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(f):
            raise RowError(field, "bad_score", f"expected a finite number, got {v!r}")
        out.append(f)
    if not out:
        raise RowError(field, "bad_score", "expected a number or a non-empty list of numbers, got []")
    return out if isinstance(value, (list, tuple)) else out[0]


SCORE_SHAPES = ("every response needs a score of one shape: one number (an Oracle), or a list of K numbers (an "
                "ensemble, for EDPO); one column holding [chosen, rejected] is read as such when it is named as both "
                "chosen_score_column and rejected_score_column")


def score_shape(score: float | list[float] | None) -> int | None:
    """0 for one number, K for a list of K (an ensemble), None for no score."""
    return None if score is None else len(score) if isinstance(score, list) else 0


def _shape_words(shape: int | None) -> str:
    return "one number" if shape == 0 else f"a list of {shape} numbers"


def _paired_scores(value: Any, field: str, from_text: bool) -> list[float | list[float]]:
    """``[chosen's score, rejected's score]`` from one column holding both (the layout of data exported
    with a ``scores`` column), each a number or an ensemble's list; raises :class:`RowError`."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RowError(field, "bad_score", f"named as both chosen_score_column and rejected_score_column, it is read "
                       f"as [chosen's score, rejected's score]: expected a list of two, got {value!r}")
    return [_check_score(v, field, from_text) for v in value]


def _check_margin(row: dict, cols: Columns, from_text: bool) -> float | None:
    """The row's margin (chosen minus rejected) by ``cols.margin``: one finite number, read from its
    column or the difference of its two score columns; raises :class:`RowError`."""
    values = []
    for name in cols.margin_columns:
        try:
            value = _check_score(row.get(name), name, from_text)
        except RowError as e:
            raise RowError(name, "bad_margin", f"{e} (the margin label_noise reads)") from None
        if isinstance(value, list):
            raise RowError(name, "bad_margin", f"expected one number (a margin for label noise), got a list {value!r}")
        values.append(value)
    if not values:
        return None
    margin = values[0] if len(values) == 1 else values[0] - values[1]
    if not math.isfinite(margin):
        raise RowError(cols.margin_columns[0], "bad_margin", f"the margin {values[0]!r} - {values[1]!r} is not finite")
    return margin


def is_conversation(value: Any) -> bool:
    """Whether a field holds a conversation (a list of ``{"role", "content"}`` messages) rather than text."""
    return isinstance(value, list)


def user_turn(text: str) -> list[dict]:
    """Text as a conversation of one user message."""
    return [{"role": "user", "content": text}]


def assistant_turn(text: str | None) -> list[dict] | None:
    """A response's text as the assistant's message (None stays None: SFT data has no rejected)."""
    return None if text is None else [{"role": "assistant", "content": text}]


def holds_conversations(source: str, column: str = "chosen") -> bool:
    """Whether the data in ``source`` is conversational, judged by its first row's ``column``."""
    _, first = next(read_rows(source))
    return is_conversation(first.get(column))


def _shared_length(a: Sequence, b: Sequence) -> int:
    """How many leading items ``a`` and ``b`` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _text_prompt_end(shared: str) -> int:
    """Where the prompt ends in the text two responses begin with (0: there is none). In an HH
    transcript (``HH_ASSISTANT`` in it) it ends after the last such marker; in other text before its
    last whitespace, so that no word is split and each response begins with the space before its
    first word, as the tokenizer sees it in the whole text."""
    if HH_ASSISTANT in shared:
        return shared.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)
    last_word = re.match(r".*\S(?=\s)", shared, re.DOTALL)
    return last_word.end() if last_word else 0


def extract_prompt(chosen: Any, rejected: Any, cols: Columns) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` from two whole conversations or texts: the prompt is what both
    begin with, as in TRL's ``extract_prompt``; for conversations the messages they share (each
    response keeps at least its last message), for text the shared beginning cut back by
    :func:`_text_prompt_end`. Raises :class:`RowError` when they share no prompt."""
    if is_conversation(chosen):
        chosen, rejected = check_messages(chosen, cols.chosen), check_messages(rejected, cols.rejected)
        end = min(_shared_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
    else:
        chosen, rejected = _check_text(chosen, cols.chosen), _check_text(rejected, cols.rejected)
        end = _text_prompt_end(chosen[: _shared_length(chosen, rejected)])
    if not end:
        raise RowError(cols.rejected, "no_shared_prompt", "chosen and rejected share no beginning to take as the prompt")
    return chosen[:end], chosen[end:], rejected[end:]


def _begins_alike(row: dict, cols: Columns) -> bool:
    """Whether ``row``'s chosen and rejected share a prompt by :func:`extract_prompt`."""
    try:
        extract_prompt(row.get(cols.chosen), row.get(cols.rejected), cols)
    except RowError:
        return False
    return True


def check_prompt(value: Any, field: str) -> str | list[dict]:
    """A prompt to answer: non-empty text, or a conversation (:func:`check_messages`) that does not end
    with an assistant turn; raises :class:`RowError`."""
    if isinstance(value, str):
        return _check_text(value, field)
    if not is_conversation(value):
        raise RowError(field, "bad_prompt", f"expected a non-empty string or a list of messages, got {value!r:.60}")
    messages = check_messages(value, field)
    if messages[-1]["role"] == "assistant":
        raise RowError(field, "bad_roles", "the prompt conversation must not end with an assistant turn")
    return messages


def _conversation_context(prompt: Any, chosen: Any, rejected: Any, cols: Columns):
    """``(context, chosen messages, rejected messages)`` of a conversational row: the context is the
    conversation before the responses' last (assistant) turn, which both must share, or, when that
    is empty, the prompt column's (text as one user turn); raises :class:`RowError`."""
    chosen_msgs = check_messages(chosen, cols.chosen)
    rejected_msgs = check_messages(rejected, cols.rejected) if cols.rejected is not None else None
    for msgs, field in ((chosen_msgs, cols.chosen), (rejected_msgs, cols.rejected)):
        if msgs is not None and msgs[-1]["role"] != "assistant":
            raise RowError(field, "bad_roles", f"the last message must have role 'assistant', got {msgs[-1]['role']!r}")
    context = chosen_msgs[:-1]
    if rejected_msgs is not None and rejected_msgs[:-1] != context:
        raise RowError(cols.rejected, "bad_roles", "chosen and rejected conversations differ before the final assistant turn")
    if not context:  # TRL layout: the prompt column holds the conversation so far
        if isinstance(prompt, str):
            context = user_turn(_check_text(prompt, cols.prompt_field))
        else:
            context = check_messages(prompt, cols.prompt_field)
    return check_prompt(context, cols.prompt_field), chosen_msgs, rejected_msgs


def _render_conversation(prompt: Any, chosen: Any, rejected: Any, template: Any, cols: Columns):
    """Split conversations into (prompt text, chosen text, rejected text) via the chat template."""
    context, chosen_msgs, rejected_msgs = _conversation_context(prompt, chosen, rejected, cols)
    if template is None:
        raise RowError(
            cols.chosen, "no_chat_template",
            "conversational rows need a tokenizer with a chat template",
        )
    prompt_text = template(context, add_generation_prompt=True)

    def response(msgs):
        full = template(context + [msgs[-1]], add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise RowError(cols.chosen, "bad_roles", "the chat template does not render the prompt as a prefix")
        return full[len(prompt_text):]

    return prompt_text, response(chosen_msgs), response(rejected_msgs) if rejected_msgs is not None else None


def render_as_chat(pair: TextPair, template, cols: Columns) -> TextPair:
    """A plain-text pair as a one-turn chat (the prompt from the user, each response from the
    assistant) rendered with ``template``: how chat reward models read text. Rendered pairs pass."""
    if pair.prompt_has_special_tokens:
        return pair
    prompt, chosen, rejected = _render_conversation(pair.prompt, assistant_turn(pair.chosen),
                                                    assistant_turn(pair.rejected), template, cols)
    return replace(pair, prompt=prompt, chosen=chosen, rejected=rejected, prompt_has_special_tokens=True)


def _row_fields(row: dict, cols: Columns) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a row, unrendered: the prompt taken from what chosen and
    rejected share when there is no prompt column, and answers given as text to a chat prompt made
    assistant turns; raises :class:`RowError`."""
    chosen, rejected = row.get(cols.chosen), row.get(cols.rejected) if cols.rejected else None
    if cols.prompt is None:
        return extract_prompt(chosen, rejected, cols)
    prompt = row.get(cols.prompt)
    if is_conversation(prompt) and not is_conversation(chosen):  # a chat prompt with answers as text
        chosen = assistant_turn(_check_text(chosen, cols.chosen))
        rejected = assistant_turn(_check_text(rejected, cols.rejected) if cols.rejected else None)
    return prompt, chosen, rejected


def row_prompt(row: dict, cols: Columns) -> str | list[dict]:
    """The prompt of a pair row as :func:`validate_row` finds it, not rendered: text, or the
    conversation so far (a text prompt before conversational answers is one user turn), for a policy
    to answer. Only the fields the prompt comes from are checked; raises :class:`RowError`."""
    prompt, chosen, rejected = _row_fields(row, cols)
    if is_conversation(chosen):
        return _conversation_context(prompt, chosen, rejected, cols)[0]
    return _check_text(prompt, cols.prompt_field)


def validate_row(row: dict, cols: Columns, template, *, from_text: bool = False) -> TextPair:
    """Check one raw row and render it to text; raises :class:`RowError`. ``from_text``: the row's
    values are all text (CSV), so scores are read from text."""
    prompt, chosen, rejected = _row_fields(row, cols)
    if is_conversation(chosen):
        prompt_text, chosen_text, rejected_text = _render_conversation(prompt, chosen, rejected, template, cols)
        conversational = True
    else:
        prompt_text = _check_text(prompt, cols.prompt_field)
        chosen_text = _check_text(chosen, cols.chosen)
        rejected_text = _check_text(rejected, cols.rejected) if cols.rejected else None
        conversational = False
    if rejected_text is not None and chosen_text == rejected_text:
        raise RowError(cols.rejected, "identical_responses", "chosen and rejected responses are identical")
    if cols.chosen_score is not None and cols.chosen_score == cols.rejected_score:
        scores = _paired_scores(row.get(cols.chosen_score), cols.chosen_score, from_text)
    else:
        scores = [_check_score(row.get(name), name, from_text) if name else None
                  for name in (cols.chosen_score, cols.rejected_score)]
    if score_shape(scores[0]) != score_shape(scores[1]):
        raise RowError(cols.rejected_score, "score_shape", f"{_shape_words(score_shape(scores[1]))}, where "
                       f"{cols.chosen_score!r} holds {_shape_words(score_shape(scores[0]))}: {SCORE_SHAPES}")
    margin = _check_margin(row, cols, from_text)
    return TextPair(prompt_text, chosen_text, rejected_text, scores[0], scores[1], conversational, margin)


def _bad_rows_error(first: tuple[str, str], bad: Counter[str], rows: int) -> DataError:
    """The error for a source with bad rows: the first one's ``(reason, message)``, and how many there are by reason."""
    reason, message = first
    if sum(bad.values()) > 1:
        message += f" ({sum(bad.values())} of {rows} rows are bad, by reason: {dict(bad)})"
    if reason == "no_chat_template":
        return DataError(message, setting="chat_template", advice="give one with {option}")
    return DataError(message, setting="on_bad_row", advice="{option} skip skips such rows")


def validated_rows(source: str, validate: Callable[[dict], T], check_first: Callable[[dict], None], *,
                   split: str = "train", on_bad_row: str = "error") -> Iterator[tuple[int, T]]:
    """``(position, validate(row))``: the rows of ``source`` read and validated one at a time, each with
    its 0-based position among the source's records (malformed JSON lines included), so that a caller
    can find the raw row again (``score`` does). ``check_first`` checks the first row's columns
    (raising :class:`DataError`); ``validate`` raises :class:`RowError` on a bad row. With
    ``on_bad_row='skip'`` bad rows (malformed lines too) are counted and logged by reason once the
    source is read; with ``error`` the whole source is still read, so the error names the first bad
    row and says how many there are."""
    usable = 0
    bad: Counter[str] = Counter()
    first: tuple[str, str] | None = None  # the first bad row's (reason, message)
    checked_columns = False
    position = -1
    for position, (row_number, row) in enumerate(read_rows(source, split, keep_malformed=True)):
        if isinstance(row, DataError):
            reason, message = "malformed_json", row.message
        else:
            if not checked_columns:
                check_first(row)
                checked_columns = True
            try:
                item = validate(row)
            except RowError as e:
                reason, message = e.reason, f"{source}: row {row_number}: field {e.field!r}: {e}"
            else:
                usable += 1
                if on_bad_row == "skip" or not bad:  # past an error, rows are only counted
                    yield position, item
                continue
        bad[reason] += 1
        first = first or (reason, message)
    if bad and on_bad_row == "error":
        raise _bad_rows_error(first, bad, position + 1)
    if bad:
        log.warning("%s: skipped %d bad rows (on_bad_row skip), by reason: %s", source, sum(bad.values()), dict(bad))
    if not usable:
        raise DataError(f"{source}: no usable rows" + (f" (skipped: {dict(bad)})" if bad else ""))


def check_columns(source: str, row: dict, cols: Columns, required: list[str]) -> None:
    """Raise the :class:`DataError` for a first row that lacks some of ``required``; a missing
    prompt whose chosen and rejected begin alike (implicit-prompt data, HH transcripts) points to
    ``prompt_column=None``."""
    missing = [c for c in required if c not in row]
    if not missing:
        return
    message = f"{source}: missing column(s) {missing}; the data has columns {sorted(row)}"
    if cols.prompt in missing and _begins_alike(row, cols):
        raise DataError(f"{message}; its {cols.chosen!r} and {cols.rejected!r} begin alike, as when they hold the prompt",
                        setting="prompt_column", advice="{option} null takes what they share as the prompt")
    raise DataError(message)


def numbered_pairs(source: str, cols: Columns, template, *, split: str = "train",
                   on_bad_row: str = "error") -> Iterator[tuple[int, TextPair]]:
    """``(position, pair)``: the rows of ``source`` validated into pairs by :func:`validated_rows`;
    every pair's scores must have the first usable row's shape."""
    from_text = holds_text_only(source)
    shapes: list[int | None] = []  # of the first usable row's scores, which every row's must have

    def pair(row: dict) -> TextPair:
        text_pair = validate_row(row, cols, template, from_text=from_text)
        shape = score_shape(text_pair.chosen_score)
        if not shapes:
            shapes.append(shape)
        elif shape != shapes[0]:
            raise RowError(cols.chosen_score, "score_shape", f"{_shape_words(shape)}, "
                           f"where the first row's holds {_shape_words(shapes[0])}: {SCORE_SHAPES}")
        return text_pair

    yield from validated_rows(source, pair, lambda row: check_columns(source, row, cols, cols.required()),
                              split=split, on_bad_row=on_bad_row)


def iter_pairs(source: str, cols: Columns, template, *, split: str = "train", on_bad_row: str = "error") -> Iterator[TextPair]:
    """The pairs of :func:`numbered_pairs`, without their positions."""
    return (pair for _, pair in numbered_pairs(source, cols, template, split=split, on_bad_row=on_bad_row))


def load_pairs(source: str, cols: Columns, template, *, split: str = "train", on_bad_row: str = "error") -> list[TextPair]:
    """Every row of :func:`iter_pairs` in a list (for data small enough to hold in memory)."""
    return list(iter_pairs(source, cols, template, split=split, on_bad_row=on_bad_row))


def swap_pair(pair: TextPair) -> None:
    """Swap chosen and rejected, and their scores, in place (the margin, chosen minus rejected, changes sign)."""
    pair.chosen, pair.rejected = pair.rejected, pair.chosen
    pair.chosen_score, pair.rejected_score = pair.rejected_score, pair.chosen_score
    if pair.margin is not None:
        pair.margin = -pair.margin
