"""The classifier's probability end to end: `query_type_confidence` in the components, and the
opt-in soft branch (R3_SOFT_BRANCH), which pays p·R_open + (1-p)·R_closed for a classifier-typed
query with a reference and p(open) inside the band. The rule is checked against hand-computed
values (spec, "The reward"), the service against its own hard rewards."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from conftest import in_process
from r3_service.qtype.learned import LearnedClassifier
from r3_service.rule.reward import PRESETS, ResolvedItem, RuleParams, score
from r3_service.settings import DEFAULT_MODEL, R3BackendSpec, Settings
from r3_tools.heads import model_embedder

# --- the rule ------------------------------------------------------------------------------------

QUERY = "the sun is hot"
RESPONSE = "the sun is hot and the sun is hot"  # 9 word tokens; trigrams 7, unique 5
REFERENCE = "It is warm."
LI, RP = 9 / 100, 5 / 7
S_QUERY, S_REFERENCE = 0.6, 1.5  # S(x, y) and S(ref, y), as the engine would hand them over
IN_RANGE, OUT_RANGE = (0.0, 2.0), (0.0, 5.12)
R_OPEN = LI * S_QUERY * RP
R_CLOSED = (S_REFERENCE - 0.0) / (2.0 - 0.0) * 5.12 * RP  # f(S(ref, y)) · RP
BAND = (0.3, 0.7)


def params(band: tuple[float, float] | None = BAND) -> RuleParams:
    return RuleParams(relevance_in_range=IN_RANGE, relevance_out_range=OUT_RANGE, lppo_target_length=100,
                      soft_branch=band)


def classified(p: float | None, reference: str | None = REFERENCE,
               source: str = "classifier") -> ResolvedItem:
    """An item typed as a classifier with p(open) = p would type it."""
    query_type = "open" if p is not None and p > 0.5 else "closed"
    return ResolvedItem(QUERY, RESPONSE, reference, query_type, source,
                        "request" if reference else None, open_probability=p)


def scored(item: ResolvedItem, preset: str = "r3", band: tuple[float, float] | None = BAND):
    """The engine's call: S of the item's own branch, and of the other one (used when it blends)."""
    pair = PRESETS[preset].relevance_pair(item)
    s, s_other = (S_REFERENCE, S_QUERY) if pair and pair[0] == "reference" else (S_QUERY, S_REFERENCE)
    return score(PRESETS[preset], item, s, params(band), s_other)


@pytest.mark.parametrize("p", [0.3, 0.42, 0.5, 0.61, 0.7])  # lo and hi are inside the band
def test_inside_the_band_the_reward_blends_both_branches(p: float) -> None:
    result = scored(classified(p))
    assert result.reward == pytest.approx(p * R_OPEN + (1 - p) * R_CLOSED, rel=1e-12)
    assert result.open_branch_weight == p
    # The parts describe the branch of the hard type.
    hard_open = p > 0.5
    assert result.relevance_target == ("query" if hard_open else "reference")
    assert result.relevance == (S_QUERY if hard_open else S_REFERENCE)
    assert result.query_type_confidence == pytest.approx(p if hard_open else 1 - p)


@pytest.mark.parametrize("p,expected", [(0.0, R_CLOSED), (0.29, R_CLOSED), (0.71, R_OPEN), (1.0, R_OPEN)])
def test_outside_the_band_the_reward_is_the_hard_branch(p: float, expected: float) -> None:
    result = scored(classified(p))
    assert result.reward == pytest.approx(expected, rel=1e-12)
    assert result.open_branch_weight is None and result.query_type_confidence == pytest.approx(max(p, 1 - p))


def test_without_a_reference_both_branches_are_the_open_rule() -> None:
    result = scored(classified(0.4, reference=None))
    assert result.reward == pytest.approx(R_OPEN, rel=1e-12)
    assert result.open_branch_weight is None and result.relevance_target == "query"


@pytest.mark.parametrize("item,preset,band", [
    (classified(0.4), "r3", None),  # soft branch off
    (classified(None, source="request"), "r3", BAND),  # the type came with the request
    (classified(0.4), "r3-no-branch", BAND),  # a preset that does not branch on the type
])
def test_no_blend_without_a_band_a_probability_or_branches(item: ResolvedItem, preset: str,
                                                           band: tuple[float, float] | None) -> None:
    result = scored(item, preset, band)
    expected = R_CLOSED if preset == "r3" and item.query_type == "closed" else R_OPEN
    assert result.reward == pytest.approx(expected, rel=1e-12) and result.open_branch_weight is None


def test_r3_novel_blends_branches_each_with_its_copy_term() -> None:
    # 8 of the response's 9 tokens sit inside the query's 4-gram "the sun is hot": each branch
    # keeps 1/9 of its reward (the reference copies nothing from the query).
    result = scored(classified(0.4), "r3-novel")
    assert result.reward == pytest.approx(0.4 * R_OPEN / 9 + 0.6 * R_CLOSED / 9, rel=1e-12)
    assert result.open_branch_weight == 0.4


def test_confidence_is_the_probability_of_the_type_used() -> None:
    assert scored(classified(0.8), band=None).query_type_confidence == pytest.approx(0.8)
    assert scored(classified(0.25), band=None).query_type_confidence == pytest.approx(0.75)
    assert scored(classified(None, source="cache"), band=None).query_type_confidence is None


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [("0.2,0.8", (0.2, 0.8)), (" 0, 1 ", (0.0, 1.0)),
                                            ("[0.25, 0.75]", (0.25, 0.75)), ("", None)])
def test_the_band_is_read_from_the_environment(value: str, expected: tuple[float, float] | None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R3_SOFT_BRANCH", value)
    assert Settings().soft_branch == expected


@pytest.mark.parametrize("value", ["0.7,0.3", "0.5,0.5", "0,1.5", "-0.1,0.5", "0.5", "[0.5]", "0.1,0.2,0.3"])
def test_a_bad_band_fails_validation_saying_what_a_band_is(value: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R3_SOFT_BRANCH", value)
    with pytest.raises(ValueError, match=r"soft_branch must be two numbers lo,hi .* 0 <= lo < hi <= 1"):
        Settings()


def test_a_backend_band_needs_a_preset_that_branches() -> None:
    assert R3BackendSpec(preset="r3-novel", soft_branch=[0.4, 0.6]).soft_branch == (0.4, 0.6)
    with pytest.raises(ValueError, match="preset 'li' has no query-type branches"):
        R3BackendSpec(preset="li", soft_branch=[0.4, 0.6])


# --- the service ---------------------------------------------------------------------------------

UNSURE_CLOSED = "Summarize the plot of Hamlet."  # the packaged head: p(open) about 0.47
UNSURE_OPEN = "What are the benefits of exercise?"  # about 0.66
LABELLED = "Soft-branch test: name the longest river in Africa."
ANSWER = "The plot follows a prince who avenges his father, and most of the cast dies by the end."


@pytest.fixture(scope="module")
def learned(embedding_model) -> LearnedClassifier:
    return LearnedClassifier(model_embedder(embedding_model), DEFAULT_MODEL)


@pytest.fixture(scope="module")
def soft_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The soft branch on everything (0,1) for r3 and r3-novel, a narrow band on `r3-narrow`, and
    one data-set label preloaded."""
    tmp = tmp_path_factory.mktemp("soft")
    labels = tmp / "labels.jsonl"
    labels.write_text(json.dumps({"query": LABELLED, "qtype": "CONSTRAINED", "output": "The Nile."}) + "\n")
    config = tmp / "deployment.yaml"
    config.write_text(json.dumps({"backends": {
        "r3": {"kind": "r3"}, "r3-novel": {"kind": "r3", "preset": "r3-novel"},
        "r3-narrow": {"kind": "r3", "soft_branch": [0.99, 1.0]}, "li": {"kind": "r3", "preset": "li"}}}))
    with in_process(config=str(config), soft_branch="0,1", qtypes_file=str(labels)) as client:
        yield client


def components(client: TestClient, items: list[dict], backend: str | None = None) -> list[tuple[float, dict]]:
    got = client.post("/reward", json={"items": items, "backend": backend, "return_components": True})
    assert got.status_code == 200, got.text
    return list(zip(got.json()["rewards"], got.json()["components"], strict=True))


async def test_classifier_typed_items_report_their_confidence(app_client: TestClient,
                                                              learned: LearnedClassifier) -> None:
    queries = [UNSURE_CLOSED, UNSURE_OPEN, "Write a poem about the sea."]
    labels = await learned.label(queries)
    items = [{"query": q, "response": ANSWER, "reference": "A tragedy."} for q in queries]
    items.append({"query": UNSURE_OPEN, "response": ANSWER, "query_type": "closed"})
    got = components(app_client, items)
    for (_, component), label in zip(got[:3], labels, strict=True):
        assert component["query_type_source"] == "classifier" and component["query_type"] == label.query_type
        confidence = component["query_type_confidence"]
        assert 0.5 < confidence <= 1.0
        p = label.open_probability
        assert confidence == pytest.approx(p if label.query_type == "open" else 1 - p, abs=1e-5)
        assert component["open_branch_weight"] is None  # the soft branch is off by default
    assert got[3][1]["query_type_source"] == "request" and got[3][1]["query_type_confidence"] is None


@pytest.mark.parametrize("backend", ["r3", "r3-novel"])
def test_soft_branch_pays_the_blend_of_the_two_hard_rewards(soft_app: TestClient, backend: str) -> None:
    for query in (UNSURE_CLOSED, UNSURE_OPEN):
        item = {"query": query, "response": ANSWER, "reference": "Hamlet avenges his father; most die."}
        (reward, component), (r_open, _), (r_closed, _) = components(soft_app, [
            item, {**item, "query_type": "open"}, {**item, "query_type": "closed"}], backend)
        p = component["open_branch_weight"]
        assert component["query_type_source"] == "classifier" and 0.1 < p < 0.9
        assert component["query_type"] == ("open" if p > 0.5 else "closed")
        assert component["query_type_confidence"] == pytest.approx(p if p > 0.5 else 1 - p)
        assert reward == pytest.approx(p * r_open + (1 - p) * r_closed, rel=1e-5)
        assert component["relevance_target"] == ("query" if p > 0.5 else "reference")
        # Scored again, the type and its probability come from the store: the same reward.
        [(again, stored)] = components(soft_app, [item], backend)
        assert stored["open_branch_weight"] == p and again == pytest.approx(reward, rel=1e-6)


def test_soft_branch_leaves_hard_rewards_alone_where_it_does_not_apply(soft_app: TestClient) -> None:
    item = {"query": UNSURE_CLOSED, "response": ANSWER, "reference": "Hamlet avenges his father."}
    hard_closed = components(soft_app, [{**item, "query_type": "closed"}])[0][0]
    # Outside r3-narrow's band [0.99, 1]: the hard closed branch.
    [(narrow, component)] = components(soft_app, [item], "r3-narrow")
    assert component["open_branch_weight"] is None and component["query_type"] == "closed"
    assert narrow == pytest.approx(hard_closed, rel=1e-5)
    # No reference: one branch only (the open rule), whatever the probability.
    no_reference = {"query": UNSURE_CLOSED, "response": ANSWER}
    (reward, component), (open_rule, _) = components(soft_app, [no_reference, {**no_reference,
                                                                               "query_type": "open"}])
    assert component["open_branch_weight"] is None and component["query_type_confidence"] is not None
    assert reward == pytest.approx(open_rule, rel=1e-5)
    # A data set's label in the store: no probability, so neither confidence nor blend.
    [(_, component)] = components(soft_app, [{"query": LABELLED, "response": "The Nile, 6,650 km."}])
    assert component["query_type_source"] == "cache" and component["query_type_confidence"] is None
    assert component["open_branch_weight"] is None
    # A preset without branches.
    [(_, component)] = components(soft_app, [item], "li")
    assert component["open_branch_weight"] is None


def test_info_shows_each_backends_band(soft_app: TestClient) -> None:
    backends = soft_app.get("/v1/info").json()["backends"]
    assert backends["r3"]["soft_branch"] == [0.0, 1.0] and backends["r3-novel"]["soft_branch"] == [0.0, 1.0]
    assert backends["r3-narrow"]["soft_branch"] == [0.99, 1.0]
    assert backends["li"]["soft_branch"] is None  # nothing to blend
