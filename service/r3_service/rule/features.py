"""R3's text features (spec, "Features"): response clean-up, word tokens, LI, RP, LPPO, and the
linear map f of the closed branch."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

GENERIC_STOP_STRINGS: tuple[str, ...] = ("\n\n\n\n", "\n\n--", "\n\n____")

# NLTK `wordpunct_tokenize` semantics: runs of word characters, or runs of other non-space chars.
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


def clean_response(text: str, stop_strings: Iterable[str] = GENERIC_STOP_STRINGS) -> str:
    """Strip, cut at the earliest stop string, strip again: text past the turn is not paid for."""
    text = text.strip()
    cut = len(text)
    for stop in stop_strings:
        if stop:
            position = text.find(stop)
            if 0 <= position < cut:
                cut = position
    return text[:cut].strip()


def word_tokens(text: str) -> list[str]:
    return _WORDPUNCT.findall(text)


def length_incentive(tokens: list[str], cap: int | None = None) -> float:
    """LI(y) = len(tokens) / 100, deliberately not normalised by a target length; with a cap
    (r3-bounded, beyond the paper), tokens past the cap count for nothing."""
    return (len(tokens) if cap is None else min(len(tokens), cap)) / 100.0


def repetition_penalty(tokens: list[str]) -> float:
    """RP(y) = unique word trigrams / trigrams; 1.0 when there is no trigram."""
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    if not trigrams:
        return 1.0
    return len(set(trigrams)) / len(trigrams)


def lppo(token_count: int, target_length: int) -> float:
    """Singhal et al.'s length reward: 1 - |len / T - 1|."""
    return 1.0 - abs(token_count / target_length - 1.0)


def linear_map(value: float, in_range: tuple[float, float], out_range: tuple[float, float]) -> float:
    """f(s) of the closed branch: linear and not clipped."""
    in_lo, in_hi = in_range
    out_lo, out_hi = out_range
    return out_lo + (value - in_lo) / (in_hi - in_lo) * (out_hi - out_lo)


def collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Features:
    """What R3 reads off a response's text alone."""

    length_incentive: float
    repetition_penalty: float
    token_count: int


def features(response: str) -> Features:
    return features_of(word_tokens(response))


def features_of(tokens: list[str]) -> Features:
    """The same, from the response's word tokens (split once elsewhere)."""
    return Features(length_incentive(tokens), repetition_penalty(tokens), len(tokens))
