"""r3-bounded: r3-guarded that stops paying for length where answers stop (LI capped; a closed
answer past its reference's budget loses the excess's share), in the rule and through the service."""

from __future__ import annotations

import pytest

from r3_service.rule.guards import detect, tokenise
from r3_service.rule.reward import PRESETS, ResolvedItem, RuleParams, score

PARAMS = RuleParams(relevance_in_range=(0.0, 1.0), relevance_out_range=(0.0, 2.56), lppo_target_length=100)
QUERY = "Describe the water cycle."
REFERENCE = "Water evaporates, condenses into clouds and falls back as rain."


def words(n: int) -> str:
    """n distinct word tokens: nothing repeated, echoed or restated."""
    return " ".join(f"w{i}" for i in range(n))


def scored(preset: str, response: str, query_type: str = "open", s: float = 0.5,
           reference: str | None = None):
    item = ResolvedItem(QUERY, response, reference, query_type, "request", None)  # type: ignore[arg-type]
    detection = detect(QUERY, tokenise(response), reference)
    return score(PRESETS[preset], item, s, PARAMS, detection=detection)


@pytest.mark.parametrize("n", [40, 99])
def test_below_the_cap_it_is_r3_guarded(n: int) -> None:
    assert scored("r3-bounded", words(n)).reward == pytest.approx(scored("r3-guarded", words(n)).reward)


def test_length_past_the_cap_earns_nothing_more() -> None:
    capped = [scored("r3-bounded", words(n)) for n in (100, 150, 300)]
    guarded = [scored("r3-guarded", words(n)).reward for n in (100, 150, 300)]
    assert [c.length_incentive for c in capped] == [1.0, 1.0, 1.0]
    assert capped[0].reward == pytest.approx(capped[2].reward)
    assert guarded[0] < guarded[1] < guarded[2]  # while r3-guarded keeps paying


def test_a_closed_answer_past_its_budget_loses_the_excess_share() -> None:
    budget = 2 * len(tokenise(REFERENCE).tokens) + 10
    within = scored("r3-bounded", words(budget), "closed", 0.8, REFERENCE)
    same = scored("r3-guarded", words(budget), "closed", 0.8, REFERENCE)
    assert within.reward == pytest.approx(same.reward)
    buried = scored("r3-bounded", words(2 * budget), "closed", 0.8, REFERENCE)
    plain = scored("r3-guarded", words(2 * budget), "closed", 0.8, REFERENCE)
    assert buried.reward == pytest.approx(plain.reward / 2)
    # A negative reward (S below the calibrated range) is not pulled up by the cut either.
    low = scored("r3-bounded", words(2 * budget), "closed", -0.5, REFERENCE)
    assert low.reward < scored("r3-guarded", words(2 * budget), "closed", -0.5, REFERENCE).reward < 0


def test_the_service_prefers_the_concise_closed_answer(app_client) -> None:
    query = "What is the capital of France?"
    concise = "The capital of France is Paris."
    padded = (f"{concise} It lies on the Seine, in the north of the country. About two million people "
              "live in the city itself. The Louvre, the largest art museum in the world, holds the Mona "
              "Lisa. The Eiffel Tower was built for the World's Fair of 1889. Notre-Dame is a Gothic "
              "cathedral on an island in the river.")
    items = [{"query": query, "response": r, "query_type": "closed", "reference": "Paris."}
             for r in (concise, padded)]
    bounded = app_client.post("/reward", json={"items": items, "backend": "r3-bounded",
                                               "return_components": True}).json()
    guarded = app_client.post("/reward", json={"items": items, "backend": "r3-guarded"}).json()["rewards"]
    assert bounded["rewards"][0] == pytest.approx(guarded[0], rel=1e-5)
    assert bounded["rewards"][0] > bounded["rewards"][1]
    assert bounded["rewards"][1] < guarded[1]
