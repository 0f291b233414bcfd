"""Embedded default task: seeded sentiment steering with a VADER gold reward.

This module builds a small but real preference-learning task that needs no
downloads, in the spirit of the IMDb sentiment experiment of the DPO paper.
Prompts are openings of review-like texts ("I watched this movie last night
and"); responses are short continuations (8-25 words) made of positive,
negative and neutral clauses, some of them negated ("the plot was not
boring"). The GOLD reward of a response is the VADER compound sentiment score
of the response text alone: an independent judge with values in [-1, 1].

Preference pairs hold two independently sampled responses to one prompt. The
label is sampled from a Bradley-Terry model on the gold difference,
P(y1 preferred) = sigmoid(bt_scale * (g1 - g2)), so near-ties are genuinely
random; an optional ``label_flip_rate`` flips an exact fraction of the
training labels on top of that.

Why the vocabulary is small: the policy trained on this task is a ~1M
parameter Llama sampled with top-p 0.8. Such a model only emits sentiment
words if they are frequent in its training data, so the responses reuse a
curated set of ~30 positive and ~30 negative COMMON words taken from VADER's
lexicon (each with a nonzero valence), plus neutral filler that VADER scores
as zero. A small vocabulary also lets a ~2000-entry byte-level BPE tokenizer
encode most words as single tokens.

Text convention: each response starts with a space, so ``prompt + response``
is the full text, and because the byte-level pre-tokenizer splits before
spaces, ``tokenize(prompt + response) == tokenize(prompt) + tokenize(response)``
(BOS aside). The tokenizer prepends BOS but never appends EOS by itself.

``python -m drdo_lightning build-embedded-default`` writes the task and trains on it.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import statistics
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from drdo_lightning.data.noise import flip_indices, flip_rows
from drdo_lightning.errors import UserError
from drdo_lightning.jsonl import read_jsonl, write_jsonl

# --------------------------------------------------------------------------
# Vocabulary. Every sentiment word has a nonzero VADER valence of the stated
# sign; every word of the prompts and neutral filler is absent from VADER's
# lexicon (tests/test_demo.py checks both).
# --------------------------------------------------------------------------

POSITIVE_ADJECTIVES = (
    "great", "wonderful", "excellent", "amazing", "brilliant", "beautiful",
    "good", "enjoyable", "fun", "funny", "lovely", "perfect", "fantastic",
    "charming", "delightful", "superb", "impressive", "clever", "gorgeous",
    "entertaining", "exciting", "fascinating",
)
NEGATIVE_ADJECTIVES = (
    "awful", "terrible", "boring", "bad", "horrible", "dull", "stupid", "poor",
    "disappointing", "weak", "ugly", "annoying", "painful", "lame", "pathetic",
    "ridiculous", "dumb", "messy", "lazy", "confusing", "irritating", "dreadful",
)
POSITIVE_VERBS = ("loved", "enjoyed", "liked", "adored")
NEGATIVE_VERBS = ("hated", "disliked")
POSITIVE_ADVERBS = ("beautifully", "brilliantly", "wonderfully", "perfectly")
NEGATIVE_ADVERBS = ("badly", "terribly", "horribly")

# Sentiment words used by fixed phrases in the clause templates below.
POSITIVE_PHRASE_WORDS = ("best", "recommend", "worth", "happily")
NEGATIVE_PHRASE_WORDS = ("worst", "waste", "mess")

POSITIVE_WORDS = POSITIVE_ADJECTIVES + POSITIVE_VERBS + POSITIVE_ADVERBS + POSITIVE_PHRASE_WORDS
NEGATIVE_WORDS = NEGATIVE_ADJECTIVES + NEGATIVE_VERBS + NEGATIVE_ADVERBS + NEGATIVE_PHRASE_WORDS

ASPECTS = (
    "acting", "story", "plot", "ending", "soundtrack", "dialogue", "cast",
    "pacing", "script", "direction", "lead actor", "cinematography", "editing",
    "opening scene",
)
FILM_NOUNS = ("movie", "film", "picture", "watch")
# VADER boosters/dampeners: neutral on their own, they scale the next word.
MODIFIERS = ("", "", "", "really ", "very ", "quite ", "so ", "extremely ", "somewhat ", "slightly ")

# Clause templates. Placeholders: {aspect}, {modifier}, {adj}, {a_adj} (adj
# with its article), {opposite_adj} (negated, so the clause keeps the wanted
# polarity), {verb}, {adverb}, {film}, {superlative}, {recommend}, {verdict}.
SENTIMENT_TEMPLATES = (
    "the {aspect} was {modifier}{adj}",
    "the {aspect} was {modifier}{adj}",
    "the {aspect} felt {adj}",
    "I found the {aspect} {modifier}{adj}",
    "it was {a_adj} {film}",
    "the {aspect} was not {opposite_adj}",
    "it was not {opposite_adj} at all",
    "I {verb} the {aspect}",
    "the {aspect} was {adverb} done",
    "it was one of the {superlative} films I have seen",
    "I would {recommend} it",
    "{verdict}",
)
POSITIVE_VERDICTS = ("it was worth every minute", "I would happily watch it again")
NEGATIVE_VERDICTS = ("it was a waste of time", "the {aspect} was a mess")

NEUTRAL_CLAUSES = (
    "I watched it at home",
    "it runs about two hours",
    "the story is set in a small town",
    "most of it takes place at night",
    "the director also wrote the script",
    "it is based on a short book",
    "my brother picked it",
    "there is a long scene on a train",
    "it was shot in black and white",
    "the lead actor is in almost every scene",
    "it came out a few years ago",
    "we watched it after dinner",
    "I saw it in a small theater",
    "it has three main characters",
    "the second half moves to the city",
    "the music was written for the film",
)
CONNECTORS = (", and ", ", and ", ", but ", ". ", ". ", ", although ", ", while ")

PROMPT_LEADS = (
    "I watched", "We saw", "I finally caught", "My sister and I watched",
    "I rented", "Last weekend I streamed", "My parents took me to see",
    "I went to see", "We rented", "I sat down with", "My dad and I watched",
    "I caught",
)
PROMPT_SUBJECTS = (
    "this movie", "this film", "the new mystery", "this family film",
    "this documentary", "the sequel", "this drama", "this spy film",
    "this animated film", "the remake", "this western", "this musical",
    "this space film", "the new superhero movie",
)
PROMPT_TAILS = (
    "last night and", "yesterday and", "with my cousins and", "on a quiet evening and",
    "at the cinema and", "over the weekend and", "on a long flight and",
    "after work and",
)
# The out-of-distribution evaluation family (``data/eval_ood.jsonl``): openings and subjects that no
# training, SFT, validation or in-distribution evaluation prompt uses (no film genre, no "movie" or
# "film"), composed with the same tails. Every word is one the tokenizer was trained on (from the
# neutral clauses and the prompts) and encodes as one token, as the training prompts' words do, and
# none is in VADER's lexicon.
OOD_PROMPT_LEADS = (
    "I saw", "We watched", "I streamed", "My brother picked", "My brother and I caught",
    "I took my brother to see",
)
OOD_PROMPT_SUBJECTS = (
    "this picture", "the black and white picture", "this story about a small town",
    "the short picture about the city", "this story set on a train", "the picture based on a book",
    "this long story about three characters",
)

MIN_RESPONSE_WORDS = 8
MAX_RESPONSE_WORDS = 25
NEUTRAL_CLAUSE_PROB = 0.3

# Special tokens in id order: unk=0, bos=1, eos=2, pad=3 (fixed by train_tokenizer).
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(len(SPECIAL_TOKENS))
MAX_LENGTH = 256

@functools.cache
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:  # an optional extra: only the embedded default's gold reward needs it
        raise UserError('the gold reward `vader` needs vaderSentiment: pip install -e ".[embedded]"') from error
    return SentimentIntensityAnalyzer()


def gold_reward(texts: Sequence[str]) -> list[float]:
    """Return the VADER compound sentiment score of each text (in [-1, 1])."""
    return [_analyzer().polarity_scores(text)["compound"] for text in texts]


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentiment_clause(rng: random.Random, positive: bool) -> str:
    """One clause whose VADER polarity is positive (or negative if not ``positive``)."""
    adj = rng.choice(POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES)
    fields = {
        "aspect": rng.choice(ASPECTS),
        "modifier": rng.choice(MODIFIERS),
        "adj": adj,
        "a_adj": _with_article(adj),
        "opposite_adj": rng.choice(NEGATIVE_ADJECTIVES if positive else POSITIVE_ADJECTIVES),
        "verb": rng.choice(POSITIVE_VERBS if positive else NEGATIVE_VERBS),
        "adverb": rng.choice(POSITIVE_ADVERBS if positive else NEGATIVE_ADVERBS),
        "film": rng.choice(FILM_NOUNS),
        "superlative": "best" if positive else "worst",
        "recommend": "recommend" if positive else "not recommend",
    }
    fields["verdict"] = rng.choice(POSITIVE_VERDICTS if positive else NEGATIVE_VERDICTS).format(**fields)
    return rng.choice(SENTIMENT_TEMPLATES).format(**fields)


def _sample_response(rng: random.Random) -> str:
    """A continuation of 8-25 words: 2-4 clauses around a random overall tone.

    Each clause is neutral with probability NEUTRAL_CLAUSE_PROB, otherwise
    positive with probability (1 + tone) / 2 for a tone drawn from U(-1, 1),
    which spreads the gold reward over [-1, 1].
    """
    tone = rng.uniform(-1.0, 1.0)
    while True:
        clauses = [
            rng.choice(NEUTRAL_CLAUSES) if rng.random() < NEUTRAL_CLAUSE_PROB
            else _sentiment_clause(rng, positive=rng.random() < (1.0 + tone) / 2.0)
            for _ in range(rng.choice((2, 2, 3, 3, 4)))
        ]
        text = clauses[0]
        for clause in clauses[1:]:
            connector = rng.choice(CONNECTORS)
            text += connector + (clause[0].upper() + clause[1:] if connector == ". " else clause)
        if MIN_RESPONSE_WORDS <= len(text.split()) <= MAX_RESPONSE_WORDS:
            return " " + text + "."


def _split_prompts(seed: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Shuffle all distinct prompts; hold out ``n_eval`` for evaluation, keep the rest for training."""
    prompts = [" ".join(parts) for parts in itertools.product(PROMPT_LEADS, PROMPT_SUBJECTS, PROMPT_TAILS)]
    if not 0 < n_eval < len(prompts) // 2:
        raise ValueError(f"n_eval must be in [1, {len(prompts) // 2 - 1}], got {n_eval}")
    random.Random(f"drdo-demo/{seed}/prompts").shuffle(prompts)
    return prompts[:n_eval], prompts[n_eval:]


def generate_ood_prompts(seed: int = 0, n: int = 200) -> list[dict]:
    """``n`` distinct out-of-distribution evaluation prompts for ``seed``, as rows ``{"prompt"}``.

    They combine :data:`OOD_PROMPT_LEADS` and :data:`OOD_PROMPT_SUBJECTS`, which no prompt of
    :func:`generate_task` uses, with the usual :data:`PROMPT_TAILS`; a seeded shuffle of all
    combinations picks them, from a stream of its own (the task's splits do not move).
    """
    prompts = [" ".join(parts) for parts in itertools.product(OOD_PROMPT_LEADS, OOD_PROMPT_SUBJECTS, PROMPT_TAILS)]
    if not 0 < n <= len(prompts):
        raise ValueError(f"n must be in [1, {len(prompts)}], got {n}")
    random.Random(f"drdo-demo/{seed}/ood_prompts").shuffle(prompts)
    return [{"prompt": prompt} for prompt in prompts[:n]]


def _sample_pairs(rng: random.Random, prompts: list[str], n: int, bt_scale: float) -> list[dict]:
    """Pairs of independent responses with a Bradley-Terry label sampled on the gold difference."""
    rows = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        y1 = _sample_response(rng)
        y2 = _sample_response(rng)
        while y2 == y1:
            y2 = _sample_response(rng)
        g1, g2 = gold_reward([y1, y2])
        p_first = 1.0 / (1.0 + math.exp(-bt_scale * (g1 - g2)))
        if rng.random() >= p_first:
            y1, y2, g1, g2 = y2, y1, g2, g1
        rows.append({"prompt": prompt, "chosen": y1, "rejected": y2,
                     "gold_chosen": g1, "gold_rejected": g2, "label_flipped": False})
    return rows


def generate_task(
    seed: int = 0,
    *,
    n_sft: int = 5000,
    n_train: int = 4000,
    n_val: int = 500,
    n_eval: int = 200,
    bt_scale: float = 5.0,
    label_flip_rate: float = 0.0,
) -> dict[str, list[dict]]:
    """Generate the task splits "sft", "train", "val" and "eval" for ``seed``.

    sft rows are {"prompt", "chosen"}; train/val rows are {"prompt", "chosen",
    "rejected", "gold_chosen", "gold_rejected", "label_flipped"}; eval rows are
    {"prompt"} with distinct prompts never used by the other splits (:func:`generate_ood_prompts`
    gives a second, out-of-distribution family of evaluation prompts).
    ``label_flip_rate`` applies to the training pairs only. Each split draws
    from its own seeded stream, so changing one size leaves the others intact.
    """
    eval_prompts, train_prompts = _split_prompts(seed, n_eval)

    def stream(split: str) -> random.Random:
        return random.Random(f"drdo-demo/{seed}/{split}")

    sft_rng = stream("sft")
    sft = [{"prompt": sft_rng.choice(train_prompts), "chosen": _sample_response(sft_rng)} for _ in range(n_sft)]
    train = _sample_pairs(stream("train"), train_prompts, n_train, bt_scale)
    flip_rows(train, flip_indices(len(train), label_flip_rate, stream("flips")), mark="label_flipped")
    val = _sample_pairs(stream("val"), train_prompts, n_val, bt_scale)
    return {"sft": sft, "train": train, "val": val, "eval": [{"prompt": p} for p in eval_prompts]}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer that prepends BOS (never EOS) and round-trips text."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_LENGTH,
    )


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """Config of a ~1M-parameter Llama with tied embeddings; ``overrides`` replace any field."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


# The Oracle's shape: the paper's Oracle is as large as its students or larger (Phi-3 or
# OPT-1.3B for 125M-2.7B students). This one has about 5.5x the student's parameters
# (5.0M against 0.91M; the same tokenizer and embedding tying).
ORACLE_SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=8)


def write_base_model(out_dir, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **shape) -> Path:
    """A randomly initialised tiny Llama (``torch.manual_seed(seed)``; ``shape`` overrides
    :func:`tiny_llama_config`) saved with ``tokenizer`` in ``out_dir``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **shape))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def write_task(out_dir, seed: int = 0, **kwargs) -> dict[str, Path]:
    """Write data/{sft,train,val,eval}.jsonl, tokenizer/, base_model/ and oracle_base_model/ under ``out_dir``.

    ``kwargs`` go to :func:`generate_task`. The tokenizer is trained on every
    prompt and response of the task; the base models are randomly initialised
    tiny Llamas saved with the tokenizer: the students' and the larger Oracle's
    (:data:`ORACLE_SHAPE`).
    Returns the paths keyed "sft", "train", "val", "eval", "tokenizer", "base_model", "oracle_base_model".
    """
    out_dir = Path(out_dir)
    task = generate_task(seed, **kwargs)
    paths: dict[str, Path] = {}
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in task.items():
        paths[split] = out_dir / "data" / f"{split}.jsonl"
        write_jsonl(paths[split], rows)

    texts = [row["prompt"] for rows in task.values() for row in rows]
    texts += [row[key] for split in ("sft", "train", "val") for row in task[split]
              for key in ("chosen", "rejected") if key in row]
    tokenizer = train_tokenizer(texts)
    paths["tokenizer"] = out_dir / "tokenizer"
    tokenizer.save_pretrained(paths["tokenizer"])

    paths["base_model"] = write_base_model(out_dir / "base_model", tokenizer, seed)
    paths["oracle_base_model"] = write_base_model(out_dir / "oracle_base_model", tokenizer, seed, **ORACLE_SHAPE)
    return paths


def describe_task(out_dir: Path, paths: dict[str, Path]) -> str:
    """Row counts, gold reward statistics, label agreement and file sizes of a written task."""
    rows = {split: [row for _, row in read_jsonl(paths[split])] for split in ("sft", "train", "val", "eval")}
    lines = ["rows: " + ", ".join(f"{split}={len(r)}" for split, r in rows.items())]
    for split in ("train", "val"):
        golds = [row[key] for row in rows[split] for key in ("gold_chosen", "gold_rejected")]
        decided = [row for row in rows[split] if row["gold_chosen"] != row["gold_rejected"]]
        agree = sum(row["gold_chosen"] > row["gold_rejected"] for row in decided) / max(len(decided), 1)
        flipped = sum(row["label_flipped"] for row in rows[split])
        lines.append(
            f"{split}: gold mean={statistics.fmean(golds):+.3f} std={statistics.pstdev(golds):.3f}, "
            f"labels agreeing with gold sign={agree:.3f} (of {len(decided)} non-tied pairs), flipped={flipped}"
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths["tokenizer"])
    lengths = [len(tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]) for row in rows["sft"]]
    lines.append(f"tokenizer: {len(tokenizer)} tokens; sft response length mean={statistics.fmean(lengths):.1f} "
                 f"max={max(lengths)} tokens")
    for name, path in paths.items():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        lines += [f"  {p.relative_to(out_dir)}: {p.stat().st_size / 1e6:.3f} MB" for p in files]
    return "\n".join(lines)
