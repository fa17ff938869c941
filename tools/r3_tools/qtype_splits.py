"""Splits and rewrites that make a query-type validation predict the figure on queries unlike
the training data (`r3-qtypes eval --strict`).

A random split of one instruction set flatters a classifier: the held-out queries share their
leading verbs, templates and `### Input:` layout with the training ones. The strict validation
(1) keeps every leading word's queries in one fold, so a verb's label is never learnt from its
own neighbours, and (2) scores each held-out query as written, with its input section dropped or
inlined (real prompts rarely have a separate input field) and lightly paraphrased in a
conversational voice. Training may augment with paraphrases too, but from a disjoint set of
phrasings (`TRAIN_PHRASINGS`), so the evaluation never sees its own augmentation.

Pure Python: no torch.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Callable, Sequence

from r3_service.qtype.base import INPUT_MARKER, split_query

Rewrite = Callable[[str], str]

_WORD = re.compile(r"[a-z]+")
_FILLER = frozenset({"please", "hi", "hey", "hello", "so", "ok", "okay"})
_QUESTION = re.compile(r"^(what|which|who|whom|whose|when|where|why|how|is|are|am|do|does|did|can|could|"
                       r"should|would|will|was|were|has|have|had)\b", re.IGNORECASE)


def leading_word(query: str) -> str:
    """The instruction's first word, lower case, greetings and `please` skipped: the unit the
    strict split groups by (the verb of an imperative, the wh-word of a question)."""
    words = _WORD.findall(split_query(query)[0].lower())
    return next((word for word in words if word not in _FILLER), "")


def grouped_folds(queries: Sequence[str], folds: int) -> list[list[int]]:
    """Row indices in `folds` folds, every leading word's rows in one fold; groups go largest
    first to the smallest fold, so folds stay near equal in size."""
    groups: dict[str, list[int]] = defaultdict(list)
    for row, query in enumerate(queries):
        groups[leading_word(query)].append(row)
    out: list[list[int]] = [[] for _ in range(folds)]
    for _, rows in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        min(out, key=len).extend(rows)
    return [sorted(fold) for fold in out]


def random_folds(queries: Sequence[str], folds: int) -> list[list[int]]:
    """Row indices in `folds` folds by a hash of each query: the same query, the same fold."""
    out: list[list[int]] = [[] for _ in range(folds)]
    for row, query in enumerate(queries):
        out[_hash(query) % folds].append(row)
    return out


def drop_input(query: str) -> str:
    """The instruction alone: many real prompts come without the material an input would hold."""
    return split_query(query)[0]


def inline_input(query: str) -> str:
    """Instruction and input as one paragraph, the way chat users paste material."""
    instruction, section = split_query(query)
    return f"{instruction} {section}" if section else instruction


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym or `I`."""
    first = text.split(" ", 1)[0]
    if not text or first == "I" or (len(first) > 1 and first.isupper()):
        return text
    return text[:1].lower() + text[1:]


def _bare(text: str) -> str:
    return text.rstrip(" .!?")


# (imperative phrasings, question phrasings); `{}` is the instruction.
Phrasings = tuple[tuple[Rewrite, ...], tuple[Rewrite, ...]]

TRAIN_PHRASINGS: Phrasings = (
    (lambda s: f"Please {_lower_first(s)}",
     lambda s: f"Could you {_lower_first(_bare(s))}?",
     lambda s: f"I'd like you to {_lower_first(s)}",
     lambda s: f"Hey, {_lower_first(s)}"),
    (lambda s: f"Quick question: {s}",
     lambda s: f"I've been wondering. {s}"),
)

EVAL_PHRASINGS: Phrasings = (
    (lambda s: f"Can you {_lower_first(_bare(s))}?",
     lambda s: f"Hi! I need some help. {s}",
     lambda s: f"I was wondering if you could {_lower_first(_bare(s))}.",
     lambda s: f"{s} Thanks!",
     lambda s: _bare(s.lower())),
    (lambda s: f"Hi, I have a question. {s}",
     lambda s: f"{s} Thanks in advance!",
     lambda s: _bare(s.lower())),
)


# Sentences of context a chat user puts before the request: the leading word is then not the task's.
TRAIN_CONTEXTS = ("I'm preparing for a meeting tomorrow.", "My teacher gave us this exercise.",
                  "This is for a side project of mine.", "I have a few minutes before dinner.")
EVAL_CONTEXTS = ("I am working on a school assignment.", "My friend and I were talking about this earlier.",
                 "Something came up at work today.", "Hello there!")


def paraphrase(query: str, phrasings: Phrasings, contexts: Sequence[str] = (), *,
               keep_input: bool = True) -> str:
    """The instruction in one of `phrasings`, after one of `contexts` for half the queries (each
    picked by a hash of the query, so a rerun gives the same text); the input section kept, or
    dropped."""
    instruction, section = split_query(query)
    imperative, question = phrasings
    choices = question if _QUESTION.match(instruction) else imperative
    digest = _hash(query)
    text = choices[digest % len(choices)](instruction)
    if contexts and digest >> 32 & 1:
        text = f"{contexts[(digest >> 40) % len(contexts)]} {text}"
    return f"{text} {INPUT_MARKER} {section}" if section and keep_input else text


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


VARIANTS: dict[str, Rewrite] = {
    "as written": lambda query: query,
    "input dropped": drop_input,
    "input inlined": inline_input,
    "paraphrased": lambda query: paraphrase(query, EVAL_PHRASINGS, EVAL_CONTEXTS, keep_input=False),
}
# The strict figure: the variants a prompt without a separate input field can take.
STRICT_VARIANTS = ("input dropped", "paraphrased")
AUGMENTATIONS: dict[str, Rewrite] = {
    "input dropped": drop_input,
    "input inlined": inline_input,
    "paraphrased": lambda query: paraphrase(query, TRAIN_PHRASINGS, TRAIN_CONTEXTS),
}
