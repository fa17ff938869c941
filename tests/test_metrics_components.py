"""The reward's parts in /metrics, per backend and query type (to watch for reward hacking), and
the Grafana dashboard that reads them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import in_process
from r3_service.metrics import COPY_BUCKETS, RELEVANCE_BUCKETS, REWARD_BUCKETS

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "r3-dashboard.json"
COPIED = "What is the capital city of France?"
ITEMS = [
    {"query": COPIED, "response": COPIED, "query_type": "open"},  # the question echoed back
    {"query": "Describe how plants make their food.", "query_type": "open",
     "response": "Plants use sunlight, water and carbon dioxide to make sugar in their leaves."},
    {"query": "Say something kind.", "response": "   ", "query_type": "open"},  # empty once cleaned
    {"query": "What is two plus two?", "response": "Four.", "reference": "4", "query_type": "closed"},
]
OPEN, CLOSED = {"backend": "r3", "query_type": "open"}, {"backend": "r3", "query_type": "closed"}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """An app of its own: its registry holds only what this module sends."""
    with in_process(qtype_classifier="rules") as client:
        yield client


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist."""
    return scrape.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape(client: TestClient) -> dict:
    return samples(client.get("/metrics").text)


def reward_sum(before: dict, after: dict, **labels: str) -> float:
    """The rewards' sum (the histogram has negative buckets, so no _sum: two counters by sign)."""
    return (delta(before, after, "r3_reward_magnitude_total", sign="positive", **labels)
            - delta(before, after, "r3_reward_magnitude_total", sign="negative", **labels))


def bucket_counts(before: dict, after: dict, name: str, **labels: str) -> dict[float, float]:
    """Upper bound -> observations added, of one labelled histogram."""
    counts = {}
    for key, got in after.items():
        found = dict(key[1])
        if key[0] == f"{name}_bucket" and labels.items() <= found.items():
            counts[float(found["le"])] = got - before.get(key, 0.0)
    return counts


def test_each_backend_records_what_it_scored(client: TestClient) -> None:
    before = scrape(client)
    answers = {backend: client.post("/reward", json={"items": ITEMS, "backend": backend,
                                                     "return_components": True}).json()
               for backend in ("r3", "li")}
    after = scrape(client)
    for backend, answer in answers.items():
        parts = answer["components"]
        for query_type, indices in (("open", [0, 1, 2]), ("closed", [3])):
            labels = {"backend": backend, "query_type": query_type}
            for name in ("r3_reward", "r3_length_incentive", "r3_repetition_penalty", "r3_copy_overlap"):
                assert delta(before, after, f"{name}_count", **labels) == len(indices), (name, labels)
            rewards = [answer["rewards"][i] for i in indices]
            assert reward_sum(before, after, **labels) == pytest.approx(sum(rewards))
            assert bucket_counts(before, after, "r3_reward", **labels) == {
                bound: sum(r <= bound for r in rewards) for bound in (*REWARD_BUCKETS, float("inf"))}
            for name, got in (("r3_length_incentive", [parts[i]["length_incentive"] for i in indices]),
                              ("r3_repetition_penalty", [parts[i]["repetition_penalty"] for i in indices])):
                assert delta(before, after, f"{name}_sum", **labels) == pytest.approx(sum(got)), name
        # The echo is wholly copied: in the top bucket only; the other open items copy nothing.
        opened = {"backend": backend, "query_type": "open"}
        top, below = (delta(before, after, "r3_copy_overlap_bucket", le=str(bound), **opened)
                      for bound in (COPY_BUCKETS[-1], COPY_BUCKETS[-2]))
        assert (top, below) == (3, 2)
        assert delta(before, after, "r3_copy_overlap_bucket", le="0.0", **opened) == 2
        assert delta(before, after, "r3_copy_overlap_sum", **opened) == 1.0
        assert delta(before, after, "r3_empty_responses_total", backend=backend) == 1
        assert delta(before, after, "r3_length_incentive_bucket", le="0.0", **opened) == 1  # the empty one
    # Relevance: every r3 item has one (open: S(x, y), closed with a reference: S(ref, y)); li none.
    relevance = [part["relevance"] for part in answers["r3"]["components"]]
    assert delta(before, after, "r3_relevance_count", **OPEN) == 3
    assert delta(before, after, "r3_relevance_count", **CLOSED) == 1
    assert bucket_counts(before, after, "r3_relevance", **OPEN) == {
        bound: sum(s <= bound for s in relevance[:3]) for bound in (*RELEVANCE_BUCKETS, float("inf"))}
    assert not [key for key in after if key[0].startswith("r3_relevance") and ("backend", "li") in key[1]]


def test_get_reward_records_with_the_clean_query(client: TestClient) -> None:
    """The copy overlap is measured on the query without its chat template: a three-word question
    echoed back is a copy (in the templated prompt it would be too short a run to count)."""
    prompt = "USER: Name a colour ASSISTANT:"
    before = scrape(client)
    got = client.post("/get_reward", json={
        "query": [prompt + " Name a colour", prompt + " Blue is a colour of the sky."],
        "prompts": [prompt, prompt], "labels": [{"query_type": "open"}, {"query_type": "open"}],
        "backend": "r3"}).json()
    after = scrape(client)
    assert delta(before, after, "r3_reward_count", **OPEN) == 2
    assert reward_sum(before, after, **OPEN) == pytest.approx(sum(got["rewards"]))
    assert delta(before, after, "r3_copy_overlap_sum", **OPEN) == 1.0
    assert delta(before, after, "r3_copy_overlap_bucket", le=str(COPY_BUCKETS[-2]), **OPEN) == 1
    assert delta(before, after, "r3_empty_responses_total", backend="r3") == 0
    assert ("r3_empty_responses_total", frozenset({("backend", "r3")})) in after  # 0 is exposed too


def test_negative_rewards_count_against_the_sum() -> None:
    from prometheus_client import generate_latest

    from r3_service.metrics import Metrics
    from r3_service.rule.reward import Scored

    metrics = Metrics()
    scored = [Scored(reward, 0.1, 1.0, None, None, "open", "request", None) for reward in (-1.5, 0.25, 2.0)]
    metrics.observe_scores("rm", scored, [0.0, 0.0, 0.0], 0)
    after = samples(generate_latest(metrics.registry).decode())
    labels = {"backend": "rm", "query_type": "open"}
    assert reward_sum({}, after, **labels) == pytest.approx(0.75)
    assert value(after, "r3_reward_bucket", le="-1.0", **labels) == 1
    assert value(after, "r3_reward_count", **labels) == 3
    assert value(after, "r3_empty_responses_total", backend="rm") == 0


def test_replicas_series_merge_under_ray_serve() -> None:
    """Under Ray Serve /metrics shows every replica's series with a `replica` label; the new ones
    keep their families and sum over replicas."""
    pytest.importorskip("ray")
    from prometheus_client import generate_latest

    from r3_service.metrics import Metrics
    from r3_service.ray_serve import merge_expositions
    from r3_service.rule.reward import Scored

    texts = {}
    for replica, rewards in (("a", (-1.0, 0.5)), ("b", (2.0,))):
        metrics = Metrics()
        metrics.observe_scores("r3", [Scored(r, 0.1, 1.0, 0.3, "query", "open", "request", None)
                                      for r in rewards], [0.0] * len(rewards), 1)
        texts[replica] = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(merge_expositions(texts))}
    assert {families[name].type for name in ("r3_reward", "r3_relevance", "r3_copy_overlap")} == {"histogram"}
    merged = samples(merge_expositions(texts))
    for replica, count in (("a", 2), ("b", 1)):
        assert value(merged, "r3_reward_count", replica=replica, **OPEN) == count
        assert value(merged, "r3_empty_responses_total", replica=replica, backend="r3") == 1
    total = sum(value(merged, "r3_reward_magnitude_total", replica=replica, sign="positive", **OPEN)
                - value(merged, "r3_reward_magnitude_total", replica=replica, sign="negative", **OPEN)
                for replica in "ab")
    assert total == pytest.approx(1.5)


# The dashboard

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions(board: dict) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and 36 <= board["schemaVersion"] <= 41
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus" for i in board["__inputs"])
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 11
    for panel in graphs:
        assert panel["targets"] and {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["backend"]["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_the_dashboard_reads_only_series_the_service_exposes(client: TestClient) -> None:
    client.post("/reward", json={"items": ITEMS, "backend": "r3"})
    families = list(text_string_to_metric_families(client.get("/metrics").text))
    exposed = {sample.name: set(sample.labels) for family in families for sample in family.samples}
    values: dict[tuple[str, str], set[str]] = {}
    for family in families:
        for sample in family.samples:
            for label, got in sample.labels.items():
                values.setdefault((sample.name, label), set()).add(got)
    board = dashboard()
    variable = next(v for v in board["templating"]["list"] if v["name"] == "backend")
    for query in (variable["definition"], variable["query"]["query"]):
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", query).groups()
        assert label in exposed[metric], query
    for expr in expressions(board):
        names = set(re.findall(r"\b(r3_\w+)", expr))
        assert names, expr
        for name in names:
            assert name in exposed, f"{name} (in {expr}) is not in /metrics"
        # Every selector is of an r3 series; each label it matches exists, each fixed value
        # (a bucket's `le`, a sign) is one the service exposes.
        for name, matchers in re.findall(r"(\w+)\{([^}]*)\}", expr):
            assert name in names, expr
            for label, op, wanted in re.findall(r'(\w+)(=~|=)"([^"]*)"', matchers):
                assert label in exposed[name], f"{name} has no label {label}"
                if op == "=":
                    assert wanted in values[name, label], f'{label}="{wanted}" is not a value of {name}'
        assert set(re.findall(r"(\w+)\s*\[", expr)) <= names, expr
    assert any('r3_copy_overlap_bucket{backend=~"$backend",le="0.5"}' in e for e in expressions(board))
