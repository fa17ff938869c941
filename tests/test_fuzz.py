"""Hostile and random input: schemathesis against the live service's own OpenAPI schema, and
hypothesis properties of the scoring rule and of batching. `scripts/fuzz-long.sh` is the long run."""

from __future__ import annotations

import math

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from r3_service.rule.features import (
    GENERIC_STOP_STRINGS,
    clean_response,
    length_incentive,
    repetition_penalty,
    word_tokens,
)
from r3_service.rule.reward import PRESETS, ResolvedItem, RuleParams, score

# --- schemathesis ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def api_schema(server_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_own_schema(case: schemathesis.Case) -> None:
    """~200 deterministic cases over every operation (examples, coverage and fuzzing phases):
    never a 5xx, and every answer is the documented content type and matches its schema.
    (Whether each status code is documented is tested on its own in test_security.py.)"""
    case.call_and_validate(checks=[not_a_server_error, content_type_conformance, response_schema_conformance])


# --- the scoring rule ------------------------------------------------------------------------

PARAMS = RuleParams(relevance_in_range=(0.0, 1.0), relevance_out_range=(0.0, 5.12), lppo_target_length=100)
RULE = settings(max_examples=300, derandomize=True, deadline=None)


@RULE
@given(st.text())
def test_length_incentive_and_repetition_penalty_for_any_unicode(text: str) -> None:
    tokens = word_tokens(clean_response(text, GENERIC_STOP_STRINGS))
    li, rp = length_incentive(tokens), repetition_penalty(tokens)
    assert math.isfinite(li) and li >= 0
    assert math.isfinite(rp) and 0 < rp <= 1


@RULE
@given(query=st.text(), response=st.text(), reference=st.none() | st.text(min_size=1),
       query_type=st.sampled_from(["open", "closed"]), relevance=st.floats(-1.0, 1.0),
       preset=st.sampled_from(sorted(PRESETS)))
def test_every_preset_scores_any_unicode_to_a_finite_reward(query: str, response: str, reference: str | None,
                                                            query_type: str, relevance: float,
                                                            preset: str) -> None:
    rule = PRESETS[preset]
    item = rule.prepare(ResolvedItem(query, clean_response(response), reference, query_type,  # type: ignore[arg-type]
                                     "request", "request" if reference else None))
    scored = score(rule, item, relevance if rule.uses_relevance else None, PARAMS)
    assert math.isfinite(scored.reward)
    assert scored.length_incentive >= 0 and 0 < scored.repetition_penalty <= 1


# --- batching, through the real service ------------------------------------------------------

WORDS = st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "Paris", "is", "capital", "2+2=4", "ü",
                         "日本", "🙂", "\n", "...", "why?"])
TEXT = st.lists(WORDS, max_size=40).map(" ".join) | st.text(max_size=120)
ITEM = st.fixed_dictionaries(
    {"query": TEXT, "response": TEXT},
    optional={"reference": st.none() | TEXT, "query_type": st.sampled_from(["open", "closed", "oe", "ce"])})


def rewards(url: str, items: list[dict]) -> list[float]:
    response = httpx.post(f"{url}/reward", json={"items": items}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["rewards"]


@settings(max_examples=6, derandomize=True, deadline=None)
@given(items=st.lists(ITEM, min_size=2, max_size=6), data=st.data())
def test_an_item_scores_the_same_alone_or_anywhere_in_a_batch(server_url: str, items: list[dict],
                                                              data: st.DataObject) -> None:
    alone = [rewards(server_url, [item])[0] for item in items]
    assert all(math.isfinite(r) for r in alone)
    order = data.draw(st.permutations(range(len(items))))
    batched = rewards(server_url, [items[i] for i in order] + [items[order[0]]])  # and a duplicate
    assert batched == pytest.approx([alone[i] for i in order] + [alone[order[0]]], rel=1e-5, abs=1e-5)
