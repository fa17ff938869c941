"""Copying the query: the n-gram mask, the overlap share, the novel text, and the r3-novel preset."""

from __future__ import annotations

import pytest

from r3_service.rule.copying import copied_mask, copy_overlap, copy_overlaps
from r3_service.rule.reward import PRESETS, ResolvedItem, RuleParams, score

PARAMS = RuleParams(relevance_in_range=(0.311, 3.622), relevance_out_range=(0.0, 5.12),
                    lppo_target_length=100)
QUERY = "What is the capital city of France?"


def item(response: str, query_type: str = "open", reference: str | None = None) -> ResolvedItem:
    return ResolvedItem(QUERY, response, reference, query_type, "request", None)  # type: ignore[arg-type]


def test_the_mask_marks_only_words_inside_a_shared_four_gram() -> None:
    query = ["a", "b", "c", "d", "e"]
    assert copied_mask(query, ["x", "a", "b", "c", "d", "y"]) == [False, True, True, True, True, False]
    assert copied_mask(query, ["a", "b", "c", "x"]) == [False] * 4  # three words in a row are not a copy
    # a query shorter than four words: n = its length
    assert copied_mask(["Why", "?"], ["why", "?", "because"]) == [True, True, False]


@pytest.mark.parametrize(("response", "expected"), [
    (QUERY, 1.0),
    ("what IS the capital CITY of france ?", 1.0),  # case does not hide a copy
    ("Paris is the capital of France.", 0.0),  # a restated phrase is not a copy
    ("", 0.0),
])
def test_copy_overlap(response: str, expected: float) -> None:
    assert copy_overlap(QUERY, response) == pytest.approx(expected)


def test_r3_novel_takes_the_copied_share_away_and_leaves_an_ordinary_answer_alone() -> None:
    r3, novel = PRESETS["r3"], PRESETS["r3-novel"]
    assert score(r3, item(QUERY), 1.0, PARAMS).reward > 0  # the hole r3-novel closes
    assert score(novel, item(QUERY), 1.0, PARAMS).reward == 0.0
    assert score(novel, item(QUERY, "closed", "Paris."), 0.8, PARAMS).reward == 0.0
    answer = item("Paris is the capital of France, on the Seine.")
    assert score(novel, answer, 0.7, PARAMS) == score(r3, answer, 0.7, PARAMS)
    padded = item(f"{QUERY} Paris, on the Seine.")  # 8 of 14 words copied
    expected = score(r3, padded, 0.7, PARAMS).reward * 6 / 14
    assert score(novel, padded, 0.7, PARAMS).reward == pytest.approx(expected)


def test_r3_novel_never_pays_more_for_copying_a_negative_reward() -> None:
    """Below the closed branch's input range f is negative: the copied share makes it worse."""
    novel, r3 = PRESETS["r3-novel"], PRESETS["r3"]
    half_copied = item(f"{QUERY} Paris, Lyon, Nice, Lille.", "closed", "Paris.")  # 8 of 16 words
    low = score(r3, half_copied, 0.1, PARAMS).reward
    assert low < 0 and score(novel, half_copied, 0.1, PARAMS).reward == pytest.approx(low * 1.5)


def test_copy_overlaps_shares_each_querys_ngrams_and_matches_one_by_one() -> None:
    pairs = [(QUERY, QUERY), (QUERY, "Paris."), ("Hi", "hi hi"), ("", "anything"), ("a b c d e", "")]
    assert copy_overlaps(pairs) == [copy_overlap(q, r) for q, r in pairs] == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_words_the_reference_also_copies_from_the_query_are_not_copying() -> None:
    """Editing tasks: the right answer reproduces the input; echoing the instruction still counts."""
    query = "Correct the grammar of this sentence.\n\nShe go to the market every morning."
    reference = "She goes to the market every morning."
    assert copy_overlap(query, reference) > 0.5
    assert copy_overlap(query, reference, exempt=reference) == 0.0
    # the instruction and the input up to "market" (the error breaks the shared 4-grams) count
    assert copy_overlap(query, query, exempt=reference) == pytest.approx(12 / 15)
    edit = ResolvedItem(query, reference, reference, "closed", "request", None)
    assert score(PRESETS["r3-novel"], edit, 0.9, PARAMS) == score(PRESETS["r3"], edit, 0.9, PARAMS)
