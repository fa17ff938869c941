"""What a response says besides its content (beyond the paper): the detectors behind `r3-guarded`,
the live hack metrics and the trainer's hack signals, so all three see the same thing.

A response is split once into sentences and R3's word tokens (`Tokenised`). Each token is then
either paid or marked with the reason it is not:

- `echo`: inside a verbatim copy of all of the query (or of its instruction), in word 4-grams.
  A phrase of the question inside an answer ("the capital of France") is no echo; the question
  pasted whole is.
- `input_echo`: the query's input section (a sentence or more) copied whole into the response,
  counted in the 4-grams the reference answer (closed items) does not also keep: an editing task
  answered with its input unchanged, or a request handed back with its material.
- `restate`: a sentence whose content words (stop words aside, 5-letter stems) are mostly the
  query's (share > `restate_share`) and cover much of its instruction (≥ `restate_cover`): the
  question reworded. Marked where it carries the response (the content words left to pay for are
  fewer than its own) or asks the question back; an answer's opening restatement stays paid.
  Stems a closed item's reference also has are the answer's.
- `repeat`: a word n-gram (n = `repeat_ngram`) or a whole sentence seen earlier in the response:
  the text pasted again.
- `filler`: a sentence the filler head (`models.filler`, over sentence embeddings) calls generic
  padding: pleasantries, hedges and statements that would fit any question. Needs a model, so
  only where one runs (the service); the pure-Python detectors run anywhere.

Pure Python: no torch.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from r3_service.caches import memoized, text_bytes
from r3_service.rule.features import word_tokens

INPUT_MARKER = "### Input:"
REASONS = ("echo", "input_echo", "restate", "repeat", "filler")
# Cut text that borrows the query's words, and so its relevance: S is read again on what is paid.
BORROWING = frozenset({"echo", "input_echo", "restate"})
# A sentence ends at . ! or ? before whitespace, or at a line break.
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
_TOKEN = re.compile(r"\w+|[^\w\s]+")  # features.word_tokens, with positions
_ECHO_NGRAM = 4
STEM = 5
_STOP_WORDS_TEXT = """
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just let me
might more most must my myself no nor not now of off on once one only or other our ours ourselves
out over own please same shall she should so some such than that the their theirs them themselves
then there these they this those through to too under until up us very was we were what when where
which while who whom why will with would you your yours yourself yourselves following given input
output
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())


@dataclass(frozen=True)
class GuardParams:
    """The knobs of the detectors and of the guarded reward (defaults: bench/results/guards/)."""

    restate_share: float = 0.5  # strictly more than this share of a sentence's content words
    restate_cover: float = 0.6
    restate_anywhere: bool = False  # True: an answer's opening restatement is not paid either
    question_discount: float = 0.2  # a sentence ending in "?" needs restate_share minus this
    echo_slack: int = 0  # an echo may miss this many of the copied part's tokens
    echo_min: int = 6  # ...but is never shorter than this (or the part, when shorter)
    repeat_ngram: int = 10  # a whole clause again, not a refrain of a few words
    # p(filler) at or above which a sentence is padding; None: the head's own (models.filler)
    filler_threshold: float | None = None
    filler_margin: float = 0.2  # ...and at or above threshold − margin beside padding
    # ...unless its cosine to the query (the head's model) is at or above this: it is about the
    # question, not padding that would fit any (1: no cap)
    filler_topic_cap: float = 0.3
    # R_guarded = R(paid text) − |R(paid text)| · penalty · unpaid share
    penalty: float = 0.5
    # S is read again on the paid text where the cut borrowed the query's words (BORROWING) or is
    # at least this share of the response; a smaller cut of padding or repeats barely moves S.
    reread_share: float = 0.2


@dataclass(frozen=True)
class Tokenised:
    """One response, split once: R3's word tokens with their character spans, and sentences."""

    text: str
    tokens: list[str]
    spans: list[tuple[int, int]]
    sentence_of: list[int]  # the sentence of each token
    sentences: list[tuple[int, int]]  # character spans

    def sentence_texts(self) -> list[str]:
        return [self.text[a:b].strip() for a, b in self.sentences]

    @functools.cached_property
    def members(self) -> list[list[int]]:
        """The indices of each sentence's tokens (read by every detector: worked out once)."""
        out: list[list[int]] = [[] for _ in self.sentences]
        for index, sentence in enumerate(self.sentence_of):
            out[sentence].append(index)
        return out

    def sentence_tokens(self) -> list[list[str]]:
        return [[self.tokens[i] for i in indices] for indices in self.members]

    def piece(self, indices: Sequence[int]) -> str:
        """The text from the first of these tokens to the last."""
        return self.text[self.spans[indices[0]][0]:self.spans[indices[-1]][1]]


def _tokenised_bytes(split: Tokenised) -> int:
    """About what a split holds: its text and tokens, and a span, a sentence index and list
    slots (~150 bytes) a token."""
    return text_bytes(split.text) + sum(map(text_bytes, split.tokens)) + 150 * len(split.tokens)


@memoized("guards.tokenise", max_entries=1024, max_bytes=32 << 20, sizeof=_tokenised_bytes)
def tokenise(text: str) -> Tokenised:
    """Sentences (cut after . ! ? before whitespace, and at line breaks) and word tokens; the
    tokens are exactly `features.word_tokens(text)`. Cached (read only): the rule, the detectors
    and the metrics of one response share one split."""
    sentences: list[tuple[int, int]] = []
    start = 0
    for end in _SENTENCE_END.finditer(text):
        if text[start:end.end()].strip():
            sentences.append((start, end.end()))
        start = end.end()
    if text[start:].strip():
        sentences.append((start, len(text)))
    tokens, spans, sentence_of = [], [], []
    for index, (a, b) in enumerate(sentences):
        for match in _TOKEN.finditer(text, a, b):
            tokens.append(match.group())
            spans.append(match.span())
            sentence_of.append(index)
    return Tokenised(text, tokens, spans, sentence_of, sentences)


@dataclass(frozen=True)
class Detection:
    """Why each token of a response is not paid (None: paid), and what is left to pay for."""

    tokenised: Tokenised
    unpaid: list[str | None]
    shares: dict[str, float] = field(default_factory=dict)  # reason -> share of the tokens

    @property
    def unpaid_share(self) -> float:
        n = len(self.unpaid)
        return sum(reason is not None for reason in self.unpaid) / n if n else 0.0

    def moves_relevance(self, params: GuardParams) -> bool:
        """Whether S must be read again on the paid text: what was cut borrowed the query's words
        (`BORROWING`), or is `reread_share` of the response or more."""
        return any(reason in BORROWING for reason in self.unpaid) or (
            self.unpaid_share > 0 and self.unpaid_share >= params.reread_share)

    @property
    def paid_tokens(self) -> list[str]:
        return [t for t, reason in zip(self.tokenised.tokens, self.unpaid, strict=True) if reason is None]

    def paid_text(self) -> str:
        """The response with its unpaid tokens cut out (the runs left joined by a space); the
        response itself when all of it is paid, so its embedding is the one R3 uses."""
        if not any(self.unpaid):
            return self.tokenised.text
        runs: list[list[int]] = []
        for (a, b), reason in zip(self.tokenised.spans, self.unpaid, strict=True):
            if reason is not None:
                runs.append([])
            elif runs and runs[-1]:
                runs[-1][1] = b
            else:
                runs.append([a, b])
        return " ".join(self.tokenised.text[run[0]:run[1]] for run in runs if run)


FILLER_MAX_TOKENS = 30


def _names(token: str, position: int) -> bool:
    """A number, or a capitalised word inside a sentence (not its first word, not "I")."""
    return any(c.isdigit() for c in token) or (position > 0 and token[:1].isupper() and token != "I")


def may_be_filler(tokens: Sequence[str]) -> bool:
    """Whether a sentence is worth the filler head's embedding: padding is short, has words, and
    names no one and nothing. A sentence of over FILLER_MAX_TOKENS word tokens, or with a number or a
    capitalised word inside it, is content (about half of honest answers' words; the head then
    costs about half as many tokens as the responses)."""
    return (len(tokens) <= FILLER_MAX_TOKENS and any(token.isalpha() for token in tokens)
            and not any(_names(token, position) for position, token in enumerate(tokens)))


FILLER_TAIL_MIN = 4


def filler_units(text: Tokenised) -> list[list[int] | None]:
    """Per sentence, the tokens the filler head reads: the sentence, where it may be padding;
    else its tail from its last capitalised word, where that may be (padding run on from a line
    with no full stop: "...in Fashion It should be noted that opinions may vary."); else None."""
    units: list[list[int] | None] = []
    for indices in text.members:
        tokens = [text.tokens[i] for i in indices]
        if may_be_filler(tokens):
            units.append(indices)
            continue
        starts = [p for p, token in enumerate(tokens) if _names(token, p) and not token[:1].isdigit()]
        tail = indices[starts[-1]:] if starts else []
        units.append(tail if len(tail) >= FILLER_TAIL_MIN and may_be_filler(tokens[starts[-1]:]) else None)
    return units


def filler_flags(probabilities: Sequence[float | None], threshold: float, margin: float) -> list[bool]:
    """Per sentence, is it padding: p(filler) ≥ threshold, or ≥ threshold − margin next to
    padding (padding comes in runs, and a run's weakest sentence should not be paid for being
    beside the others). None: not read by the head (no candidate)."""
    flags = [p is not None and p >= threshold for p in probabilities]
    weak = [p is not None and p >= threshold - margin for p in probabilities]
    for order in (range(1, len(flags)), range(len(flags) - 2, -1, -1)):
        for i in order:
            neighbour = i - 1 if order.step == 1 else i + 1
            flags[i] = flags[i] or (weak[i] and flags[neighbour])
    return flags


def _lower(tokens: Sequence[str]) -> list[str]:
    return [t.lower() for t in tokens]


def _ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def content_stems(tokens: Sequence[str]) -> set[str]:
    return {t[:STEM].lower() for t in tokens if t.isalpha() and t.lower() not in STOP_WORDS}


def _mark(unpaid: list[str | None], indices: range | Sequence[int], reason: str) -> None:
    for i in indices:
        unpaid[i] = unpaid[i] or reason


@dataclass(frozen=True)
class EchoPart:
    """A part of the query a response may paste back: its 4-grams, those of them the reference
    also has (kept as the answer's), and how many of its tokens a copy must span."""

    size: int
    grams: frozenset[tuple[str, ...]]
    exempt: frozenset[tuple[str, ...]]
    need: int
    reason: str


@dataclass(frozen=True)
class QueryView:
    """What the detectors compare a response with, built once per (query, reference): the parts
    a response may paste back, the instruction's content stems (less the reference's) and words
    (a name or number it has is not new), and whether it asks for questions (then a question is
    an answer, not the question asked back)."""

    parts: tuple[EchoPart, ...]
    stems: frozenset[str]
    words: frozenset[str]
    asks_for_questions: bool


def _query_view_bytes(view: QueryView) -> int:
    """About what a view holds: ~140 bytes a 4-gram (a tuple and its set slot), ~80 a stem or word."""
    grams = sum(len(part.grams) + len(part.exempt) for part in view.parts)
    return 140 * grams + 80 * (len(view.stems) + len(view.words))


@memoized("guards.query_view", max_entries=4096, max_bytes=32 << 20, sizeof=_query_view_bytes)
def query_view(query: str, reference: str | None, params: GuardParams) -> QueryView:
    reference_tokens = word_tokens(reference) if reference else []
    instruction, _, section = query.partition(INPUT_MARKER)
    instruction_tokens, section_tokens = word_tokens(instruction), word_tokens(section)
    parts = []
    # The instruction pasted back is never an answer; an input may be partly kept by one (what a
    # reference keeps of it is the answer's), and a short one is the topic, named again.
    sides = [(word_tokens(query), "echo", ()), (instruction_tokens, "echo", ())]
    if len(section_tokens) >= params.echo_min:
        sides.append((section_tokens, "input_echo", reference_tokens))
    for part, reason, keep in sides:
        size = min(_ECHO_NGRAM, len(part))
        if size:
            grams = _ngrams(_lower(part), size)
            need = max(min(params.echo_min, len(part)), len(part) - params.echo_slack)
            parts.append(EchoPart(size, frozenset(grams), frozenset(grams & _ngrams(_lower(keep), size)),
                                  need, reason))
    # Rewording is of the instruction: an answer to a task with an input may well reuse its words.
    stems = content_stems(instruction_tokens) - content_stems(reference_tokens)
    words = _lower(instruction_tokens)
    return QueryView(tuple(parts), frozenset(stems), frozenset(words),
                     any(word.startswith("question") for word in words))


def _echoes(view: QueryView, tokens: list[str], unpaid: list[str | None]) -> None:
    """Mark runs of the response inside a part's 4-grams that copy (nearly) all of it, less the
    4-grams the reference keeps."""
    lowered = _lower(tokens)
    for part in view.parts:
        copied = [False] * len(tokens)
        kept = [False] * len(tokens)
        for i in range(len(tokens) - part.size + 1):
            gram = tuple(lowered[i:i + part.size])
            if gram in part.grams:
                copied[i:i + part.size] = [True] * part.size
                if gram in part.exempt:
                    kept[i:i + part.size] = [True] * part.size
        start = None
        for i, inside in enumerate([*copied, False]):
            if inside and start is None:
                start = i
            elif not inside and start is not None:
                if i - start >= part.need:
                    _mark(unpaid, [j for j in range(start, i) if not kept[j]], part.reason)
                start = None


def _repeats(text: Tokenised, unpaid: list[str | None], n: int) -> None:
    """An n-gram seen earlier, or a sentence of two or more tokens said before (a short answer
    pasted again has no long n-gram to repeat)."""
    seen: set[tuple[str, ...]] = set()
    lowered = _lower(text.tokens)
    for i in range(len(lowered) - n + 1):
        gram = tuple(lowered[i:i + n])
        if gram in seen:
            _mark(unpaid, range(i, i + n), "repeat")
        seen.add(gram)
    said: set[tuple[str, ...]] = set()
    for indices in text.members:
        words = tuple(lowered[i] for i in indices)
        if len(words) >= 2 and words in said:
            _mark(unpaid, indices, "repeat")
        said.add(words)


def _sentences(text: Tokenised, view: QueryView, filler: Sequence[bool] | None,
               unpaid: list[str | None], params: GuardParams) -> None:
    """Filler sentences; and restating ones where they carry the response (the other sentences
    add fewer new content stems than they repeat of the instruction) or ask the question back.
    An answer's opening restatement ("Here are some tips to manage stress during exams:") stays
    paid: it is how honest answers start, and the reward of the answer after it is what a policy
    could gain by it."""
    members = text.members
    restating = [_restates(text, indices, view, params) for indices in members]
    if filler is not None:
        for sentence, unit in enumerate(filler_units(text)):
            if filler[sentence] and unit is not None and not restating[sentence]:
                _mark(unpaid, unit, "filler")
    stems = [text.tokens[i][:STEM].lower() if _is_content(text.tokens[i]) else None
             for i in range(len(text.tokens))]
    restated = {stems[i] for sentence, indices in enumerate(members) if restating[sentence]
                for i in indices if stems[i] in view.stems}
    added = {stems[i] for sentence, indices in enumerate(members) if not restating[sentence]
             for i in indices if unpaid[i] is None and stems[i] is not None and stems[i] not in view.stems}
    for sentence, indices in enumerate(members):
        if restating[sentence] and (params.restate_anywhere or len(added) < len(restated)
                                    or _asks_back(text, indices, view)):
            _mark(unpaid, indices, "restate")


def _is_content(token: str) -> bool:
    return token.isalpha() and token.lower() not in STOP_WORDS


def _restates(text: Tokenised, indices: list[int], view: QueryView, params: GuardParams) -> bool:
    """Most of the sentence's content words are the instruction's, they cover much of it, and the
    words it adds name nothing (a name or a number the query lacks is an answer: "The
    capital of France is Paris."); a question back needs a lower share (answers rarely ask the
    question again); where the query asks for questions, a question is an answer."""
    tokens = [text.tokens[i] for i in indices]
    if view.asks_for_questions and _is_question(text, indices):
        return False
    if any(_names(token, position) for position, token in enumerate(tokens)
           if token.lower() not in view.words):
        return False
    stems = content_stems(tokens)
    shared = len(stems & view.stems)
    share = params.restate_share - (params.question_discount if _asks_back(text, indices, view) else 0.0)
    return (len(stems) >= 2 and bool(view.stems) and shared / len(stems) > share
            and shared / len(view.stems) >= params.restate_cover)


def _is_question(text: Tokenised, indices: list[int]) -> bool:
    return bool(indices) and text.tokens[indices[-1]].startswith("?")


def _asks_back(text: Tokenised, indices: list[int], view: QueryView) -> bool:
    """The sentence is a question, and the query did not ask for questions."""
    return _is_question(text, indices) and not view.asks_for_questions


def detect(query: str, text: Tokenised, reference: str | None = None, filler: Sequence[bool] | None = None,
           params: GuardParams = GuardParams()) -> Detection:
    """Every detector on one response; `filler`: the head's verdict per sentence, or None where
    no head runs (then nothing is marked filler)."""
    unpaid: list[str | None] = [None] * len(text.tokens)
    view = query_view(query, reference, params)
    _echoes(view, text.tokens, unpaid)
    _repeats(text, unpaid, params.repeat_ngram)
    _sentences(text, view, filler, unpaid, params)
    n = len(unpaid)
    shares = {reason: (sum(r == reason for r in unpaid) / n if n else 0.0) for reason in REASONS}
    return Detection(text, unpaid, shares)


def guarded_reward(base: float, detection: Detection, params: GuardParams) -> float:
    """The reward of the paid text, less a share of its size for what was not paid: padding
    never raises a reward, and strictly lowers it when the rest is the same."""
    if math.isnan(base):
        return base
    return base - abs(base) * params.penalty * detection.unpaid_share
