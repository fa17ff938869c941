"""What a response says besides its content (beyond the paper): the detectors behind `r3-guarded`,
the live hack metrics and the trainer's hack signals, so all three see the same thing.

A response is split once into sentences and R3's word tokens (`Tokenised`). Each token is then
either paid or marked with the reason it is not:

- `echo`: inside a verbatim copy of all of the query (or of its instruction), in word 4-grams.
  A phrase of the question inside an answer ("the capital of France") is no echo; the question
  pasted whole is.
- `input_echo`: a verbatim copy of all of the query's input section, in 4-grams the reference
  answer (closed items) does not also copy: an editing task answered with its input unchanged.
- `restate`: a sentence whose content words (stop words aside, 5-letter stems) come mostly from
  the instruction (share ≥ `restate_share`) and cover much of it (≥ `restate_cover`): the
  question reworded. Marked where it carries the response (nothing else left to pay for) or asks
  the question back; an answer's opening restatement stays paid. Stems a closed item's reference
  also has are the answer's.
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

from r3_service.rule.features import word_tokens

INPUT_MARKER = "### Input:"
REASONS = ("echo", "input_echo", "restate", "repeat", "filler")
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

    restate_share: float = 0.5
    restate_cover: float = 0.5
    question_discount: float = 0.2  # a sentence ending in "?" needs restate_share minus this
    echo_slack: int = 0  # an echo may miss this many of the copied part's tokens
    echo_min: int = 6  # ...but is never shorter than this (or the part, when shorter)
    repeat_ngram: int = 10  # a whole clause again, not a refrain of a few words
    # p(filler) at or above which a sentence is padding; None: the head's own (models.filler)
    filler_threshold: float | None = None
    # R_guarded = R(paid text) − |R(paid text)| · penalty · unpaid share
    penalty: float = 0.5


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

    def sentence_tokens(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in self.sentences]
        for token, sentence in zip(self.tokens, self.sentence_of, strict=True):
            out[sentence].append(token)
        return out


def tokenise(text: str) -> Tokenised:
    """Sentences (cut after . ! ? before whitespace, and at line breaks) and word tokens; the
    tokens are exactly `features.word_tokens(text)`."""
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


def may_be_filler(tokens: Sequence[str]) -> bool:
    """Whether a sentence is worth the filler head's embedding: padding is short and names no
    one and nothing. A sentence of over FILLER_MAX_TOKENS word tokens, or with a number or a
    capitalised word inside it, is content (about half of honest answers' words; the head then
    costs about half as many tokens as the responses)."""
    return len(tokens) <= FILLER_MAX_TOKENS and not any(
        any(c.isdigit() for c in token) or (position > 0 and token[:1].isupper() and token != "I")
        for position, token in enumerate(tokens))


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
class QueryView:
    """What the detectors compare a response with, built once per (query, reference): the
    4-grams of the instruction and of the input section (less the reference's) with the run
    length that counts as a copy of each, and the query's content stems (less the reference's)."""

    parts: tuple[tuple[int, frozenset[tuple[str, ...]], int, str], ...]  # (n, grams, need, reason)
    stems: frozenset[str]


@functools.lru_cache(maxsize=4096)
def query_view(query: str, reference: str | None, params: GuardParams) -> QueryView:
    reference_tokens = word_tokens(reference) if reference else []
    exempt = _lower(reference_tokens)
    instruction, _, section = query.partition(INPUT_MARKER)
    parts = []
    # The instruction pasted back is never an answer; an input may be partly kept by one.
    sides = [(word_tokens(query), "echo", []), (word_tokens(instruction), "echo", [])]
    section_tokens = word_tokens(section)
    # An input handed back is a hack where a reference says what the answer keeps of it (closed
    # items), and only for an input of a sentence or more: a short one is the topic, named again.
    if reference is not None and len(section_tokens) >= params.echo_min:
        sides.append((section_tokens, "input_echo", exempt))
    for part, reason, keep in sides:
        size = min(_ECHO_NGRAM, len(part))
        if size:
            grams = frozenset(_ngrams(_lower(part), size) - _ngrams(keep, size))
            need = max(min(params.echo_min, len(part)), len(part) - params.echo_slack)
            parts.append((size, grams, need, reason))
    # Rewording is of the instruction: an answer to a task with an input may well reuse its words.
    stems = content_stems(word_tokens(instruction)) - content_stems(reference_tokens)
    return QueryView(tuple(parts), frozenset(stems))


def _echoes(view: QueryView, tokens: list[str], unpaid: list[str | None]) -> None:
    """Mark runs of the response inside the query's 4-grams that copy (nearly) all of the
    query's instruction or of its input section."""
    lowered = _lower(tokens)
    for size, grams, need, reason in view.parts:
        mask = [False] * len(tokens)
        for i in range(len(tokens) - size + 1):
            if tuple(lowered[i:i + size]) in grams:
                mask[i:i + size] = [True] * size
        start = None
        for i, copied in enumerate([*mask, False]):
            if copied and start is None:
                start = i
            elif not copied and start is not None:
                if i - start >= need:
                    _mark(unpaid, range(start, i), reason)
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
    sentences: dict[int, list[int]] = {}
    for i, sentence in enumerate(text.sentence_of):
        sentences.setdefault(sentence, []).append(i)
    said: set[tuple[str, ...]] = set()
    for indices in sentences.values():
        words = tuple(lowered[i] for i in indices)
        if len(words) >= 2 and words in said:
            _mark(unpaid, indices, "repeat")
        said.add(words)


def _sentences(text: Tokenised, query_stems: frozenset[str], filler: Sequence[bool] | None,
               unpaid: list[str | None], params: GuardParams) -> None:
    """Filler sentences; and restating ones where they carry the response (what else is left to
    pay for is shorter than they are) or ask the question back. An answer's opening restatement
    ("Here are some tips to manage stress during exams:") stays paid: it is how honest answers
    start, and the reward of the answer after it is what a policy could gain by it."""
    members: list[list[int]] = [[] for _ in text.sentences]
    for i, sentence in enumerate(text.sentence_of):
        members[sentence].append(i)
    restating = [_restates(text, indices, query_stems, params) for indices in members]
    for sentence, indices in enumerate(members):
        if filler is not None and filler[sentence] and not restating[sentence]:
            _mark(unpaid, indices, "filler")
    restated = sum(len(indices) for sentence, indices in enumerate(members) if restating[sentence])
    content = sum(unpaid[i] is None for sentence, indices in enumerate(members) if not restating[sentence]
                  for i in indices)
    for sentence, indices in enumerate(members):
        if restating[sentence] and (content < restated or _asks(text, indices)):
            _mark(unpaid, indices, "restate")


def _restates(text: Tokenised, indices: list[int], query_stems: frozenset[str], params: GuardParams) -> bool:
    """Most of the sentence's content words are the question's, they cover much of it, and the
    words it adds name nothing (a name or a number it adds is an answer: "The capital of France
    is Paris."); a question back needs a lower share (answers rarely ask the question again)."""
    tokens = [text.tokens[i] for i in indices]
    if any(_names(token, position) for position, token in enumerate(tokens)
           if token[:STEM].lower() not in query_stems):
        return False
    stems = content_stems(tokens)
    shared = len(stems & query_stems)
    share = params.restate_share - (params.question_discount if _asks(text, indices) else 0.0)
    return (len(stems) >= 2 and bool(query_stems) and shared / len(stems) >= share
            and shared / len(query_stems) >= params.restate_cover)


def _names(token: str, position: int) -> bool:
    """A number, or a capitalised word inside a sentence (not its first word, not "I")."""
    return any(c.isdigit() for c in token) or (position > 0 and token[:1].isupper() and token != "I")


def _asks(text: Tokenised, indices: list[int]) -> bool:
    return bool(indices) and text.tokens[indices[-1]].startswith("?")


def detect(query: str, text: Tokenised, reference: str | None = None, filler: Sequence[bool] | None = None,
           params: GuardParams = GuardParams()) -> Detection:
    """Every detector on one response; `filler`: the head's verdict per sentence, or None where
    no head runs (then nothing is marked filler)."""
    unpaid: list[str | None] = [None] * len(text.tokens)
    view = query_view(query, reference, params)
    _echoes(view, text.tokens, unpaid)
    _repeats(text, unpaid, params.repeat_ngram)
    _sentences(text, view.stems, filler, unpaid, params)
    n = len(unpaid)
    shares = {reason: (sum(r == reason for r in unpaid) / n if n else 0.0) for reason in REASONS}
    return Detection(text, unpaid, shares)


def guarded_reward(base: float, detection: Detection, params: GuardParams) -> float:
    """The reward of the paid text, less a share of its size for what was not paid: padding
    never raises a reward, and strictly lowers it when the rest is the same."""
    if math.isnan(base):
        return base
    return base - abs(base) * params.penalty * detection.unpaid_share
