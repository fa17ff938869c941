"""R3's text features and rule against hand-computed values (spec, "Features" and "The reward")."""

from __future__ import annotations

import pytest

from r3_service.rule.features import (
    clean_response,
    length_incentive,
    linear_map,
    lppo,
    repetition_penalty,
    word_tokens,
)
from r3_service.rule.querytypes import parse_query_type
from r3_service.rule.reward import PRESETS, ResolvedItem, RuleParams, random_query_type, score

PARAMS = RuleParams(relevance_in_range=(0.0, 3.5), relevance_out_range=(0.0, 5.12), lppo_target_length=10)


def item(response: str, query_type: str = "open", reference: str | None = None) -> ResolvedItem:
    return ResolvedItem("the query", response, reference, query_type, "request",  # type: ignore[arg-type]
                        "request" if reference else None)


def test_word_tokens_follow_wordpunct() -> None:
    assert word_tokens("Hello, world!! it's 3.5") == ["Hello", ",", "world", "!!", "it", "'", "s",
                                                     "3", ".", "5"]
    assert word_tokens("  \n\t ") == []
    assert word_tokens("naïve café — 東京") == ["naïve", "café", "—", "東京"]


def test_word_tokens_match_nltk() -> None:
    from nltk.tokenize import wordpunct_tokenize

    text = "Dr. Smith's $3.50 (approx.) e-mail: a@b.com... done?!\n\nNext: «quoted» ünïcode_words"
    assert word_tokens(text) == wordpunct_tokenize(text)


def test_length_incentive_counts_tokens_over_100() -> None:
    assert length_incentive(word_tokens("one two, three.")) == pytest.approx(0.05)  # 5 tokens
    assert length_incentive([]) == 0.0
    assert length_incentive(["w"] * 250) == pytest.approx(2.5)  # not normalised by a target


def test_repetition_penalty_without_repeats_is_one() -> None:
    assert repetition_penalty(word_tokens("a b c d e")) == 1.0  # 3 trigrams, all unique


def test_repetition_penalty_with_repeats() -> None:
    # tokens a b a b a b: trigrams (a,b,a) (b,a,b) (a,b,a) (b,a,b) → 2 unique of 4
    assert repetition_penalty(word_tokens("a b a b a b")) == pytest.approx(0.5)
    # "x x x x x": 3 trigrams, all (x,x,x) → 1/3
    assert repetition_penalty(["x"] * 5) == pytest.approx(1 / 3)


def test_repetition_penalty_is_one_below_three_tokens() -> None:
    assert repetition_penalty([]) == 1.0
    assert repetition_penalty(["a", "a"]) == 1.0


def test_linear_map_is_linear_and_unclipped() -> None:
    assert linear_map(1.75, (0.0, 3.5), (0.0, 5.12)) == pytest.approx(2.56)
    assert linear_map(0.5, (0.0, 1.0), (0.0, 5.12)) == pytest.approx(2.56)
    assert linear_map(4.2, (0.0, 3.5), (0.0, 5.12)) == pytest.approx(4.2 / 3.5 * 5.12)  # above hi
    assert linear_map(-0.2, (0.0, 1.0), (0.0, 5.12)) == pytest.approx(-1.024)  # below lo


def test_lppo() -> None:
    assert lppo(10, 10) == 1.0
    assert lppo(5, 10) == pytest.approx(0.5)
    assert lppo(30, 10) == pytest.approx(-1.0)


def test_clean_response_cuts_at_the_earliest_stop_string() -> None:
    assert clean_response("  answer here \n\n--\nsignature") == "answer here"
    assert clean_response("a\n\n____b\n\n\n\nc") == "a"
    assert clean_response("one\n\n\n\ntwo") == "one"
    stops = ("\n\n\n\n", "USER:", "ASSISTANT:")
    assert clean_response(" Sure! USER: and now me ASSISTANT: ok", stops) == "Sure!"
    assert clean_response("\n\n  nothing to cut  \n") == "nothing to cut"
    assert clean_response("USER: all gone", stops) == ""


@pytest.mark.parametrize("spelling,expected", [
    ("open", "open"), ("OE", "open"), ("Open-Ended", "open"), ("OPENENDED", "open"),
    ("closed", "closed"), ("ce", "closed"), ("closed-ended", "closed"), ("CONSTRAINED", "closed"),
    ("closed_ended", "closed"),
])
def test_query_type_spellings(spelling: str, expected: str) -> None:
    assert parse_query_type(spelling) == expected


def test_unknown_query_type_is_rejected_with_the_accepted_list() -> None:
    with pytest.raises(ValueError, match=r"unknown query type 'maybe'.*constrained"):
        parse_query_type("maybe")


def test_open_rule() -> None:
    # 10 distinct tokens: LI 0.1, RP 1.0; S = 0.8 → 0.08
    response = "a b c d e f g h i j"
    result = score(PRESETS["r3"], item(response), 0.8, PARAMS)
    assert result.reward == pytest.approx(0.1 * 0.8 * 1.0)
    assert (result.relevance_target, result.relevance) == ("query", 0.8)


def test_open_rule_with_repetition() -> None:
    # a b a b a b: LI 0.06, RP 0.5, S 2.0 → 0.06
    result = score(PRESETS["r3"], item("a b a b a b"), 2.0, PARAMS)
    assert result.reward == pytest.approx(0.06 * 2.0 * 0.5)
    assert result.repetition_penalty == pytest.approx(0.5)


def test_closed_rule_uses_the_reference_and_no_length() -> None:
    # closed with reference: f(1.75) = 2.56, RP 0.5 → 1.28, whatever the length
    result = score(PRESETS["r3"], item("a b a b a b", "closed", "ref"), 1.75, PARAMS)
    assert result.reward == pytest.approx(2.56 * 0.5)
    assert result.relevance_target == "reference"


def test_closed_query_without_reference_uses_the_open_rule() -> None:
    result = score(PRESETS["r3"], item("a b c", "closed", None), 1.5, PARAMS)
    assert result.reward == pytest.approx(0.03 * 1.5)
    assert result.relevance_target == "query"


def test_ablation_presets() -> None:
    closed = item("a b a b a b", "closed", "ref")
    assert score(PRESETS["r3-no-branch"], closed, 2.0, PARAMS).reward == pytest.approx(0.06 * 2.0 * 0.5)
    assert PRESETS["r3-no-branch"].relevance_pair(closed) == ("query", "the query")
    assert score(PRESETS["li-rp"], closed, None, PARAMS).reward == pytest.approx(0.03)
    assert score(PRESETS["li"], closed, None, PARAMS).reward == pytest.approx(0.06)
    assert score(PRESETS["relevance"], closed, 0.7, PARAMS).reward == pytest.approx(0.7)
    assert score(PRESETS["lppo"], closed, None, PARAMS).reward == pytest.approx(1 - abs(6 / 10 - 1))
    for name in ("li-rp", "li", "lppo"):
        assert not PRESETS[name].uses_relevance
        assert score(PRESETS[name], closed, None, PARAMS).relevance is None


def test_random_type_preset_is_a_fixed_coin_per_query() -> None:
    queries = [f"query number {i}" for i in range(200)]
    types = [random_query_type(q) for q in queries]
    assert types == [random_query_type(q) for q in queries]  # stable
    assert 60 < types.count("closed") < 140  # a fair coin, not a constant
    preset = PRESETS["r3-random-type"]
    for query_type in ("open", "closed"):
        query = next(q for q, t in zip(queries, types, strict=True) if t == query_type)
        resolved = ResolvedItem(query, "a b c", "ref", "open", "request", "request")
        result = score(preset, preset.prepare(resolved), 1.75, PARAMS)
        assert result.query_type == query_type
        expected = 2.56 if query_type == "closed" else 0.03 * 1.75
        assert result.reward == pytest.approx(expected)
