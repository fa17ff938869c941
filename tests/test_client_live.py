"""r3_client and its trainer adapters against the live service (`server_url` from conftest)."""

from __future__ import annotations

import math
import re

import httpx
import pytest
from pytest import MonkeyPatch

from r3_client import AsyncRewardClient, Components, RewardClient, RewardItem, ScoredBatch, adapters

ITEMS = [
    RewardItem(
        "What is the capital of France?",
        "The capital of France is Paris.",
        reference="Paris is the capital of France.",
        query_type="closed",
    ),
    RewardItem(
        "Write a short poem about the sea.",
        "Waves roll in, silver and slow; the tide keeps time under a patient moon.",
        query_type="open-ended",
    ),
    RewardItem(
        "Give me three tips for better sleep.",
        "Keep a regular schedule, avoid screens before bed, and keep the room cool and dark.",
    ),
]


def raw_reward(url: str, items: list[RewardItem], **extra: object) -> dict:
    """The service's own answer, bypassing the client."""
    payload = [
        {"query": i.query, "response": i.response, "reference": i.reference, "query_type": i.query_type}
        for i in items
    ]
    answer = httpx.post(f"{url}/reward", json={"items": payload, **extra}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def client_scores(url: str, items: list[RewardItem]) -> list[float]:
    with RewardClient(url) as client:
        return client.score(items)


async def test_sync_async_and_raw_http_agree(server_url: str) -> None:
    expected = raw_reward(server_url, ITEMS)["rewards"]
    with RewardClient(server_url) as client:
        sync_rewards = client.score(ITEMS)
    async with AsyncRewardClient(server_url, chunk_size=1) as async_client:
        async_rewards = await async_client.score(ITEMS)
    for rewards in (sync_rewards, async_rewards):
        assert len(rewards) == 3
        assert all(isinstance(r, float) and math.isfinite(r) for r in rewards)
        assert rewards == pytest.approx(expected, abs=1e-6)
    assert len(set(sync_rewards)) == 3  # three different answers, three different rewards


def test_components_on_request(server_url: str) -> None:
    raw = raw_reward(server_url, ITEMS, return_components=True)
    with RewardClient(server_url, chunk_size=2) as client:
        assert client.ready() is True
        assert isinstance(client.info(), dict)
        batch = client.score(ITEMS, return_components=True)
        plain = client.score(ITEMS)
    assert isinstance(batch, ScoredBatch)
    assert batch.backend == raw["backend"]
    assert batch.rewards == pytest.approx(plain, abs=1e-6)
    assert all(isinstance(c, Components) for c in batch.components)
    closed, open_, unlabelled = batch.components
    assert (closed.query_type, closed.query_type_source) == ("closed", "request")
    assert (closed.reference_source, closed.relevance_target) == ("request", "reference")
    assert (open_.query_type, open_.query_type_source, open_.relevance_target) == ("open", "request", "query")
    assert unlabelled.query_type_source in {"cache", "classifier", "default"}
    # The open branch is LI · S(x, y) · RP, with LI = word tokens / 100.
    tokens = re.findall(r"\w+|[^\w\s]+", ITEMS[1].response)
    assert open_.length_incentive == pytest.approx(len(tokens) / 100)
    assert open_.relevance is not None
    expected_open = open_.length_incentive * open_.relevance * open_.repetition_penalty
    assert batch.rewards[1] == pytest.approx(expected_open, abs=1e-6)


def test_trl_reward_func_with_strings(server_url: str) -> None:
    reward_func = adapters.make_reward_func(server_url)
    rewards = reward_func(
        prompts=[item.query for item in ITEMS],
        completions=[item.response for item in ITEMS],
        reference=[item.reference for item in ITEMS],
        query_type=[item.query_type for item in ITEMS],
        trainer_state=object(),
        completion_ids=[[1, 2, 3]] * 3,
    )
    assert reward_func.__name__ == "r3"
    assert rewards == pytest.approx(client_scores(server_url, ITEMS), abs=1e-6)


async def test_trl_reward_funcs_with_chat_messages(server_url: str) -> None:
    prompts = [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital\nof   France?"},
        ],
        [{"role": "user", "content": "Write a short poem about the sea."}],
    ]
    completions = [
        [{"role": "assistant", "content": "The capital of France is Paris."}],
        [{"role": "assistant", "content": "Waves roll in, silver and slow."}],
    ]
    kwargs = {"solution": ["Paris is the capital of France.", None], "trainer_state": object(), "x": 1}
    expected = client_scores(
        server_url,
        [
            RewardItem(
                "What is the capital of France?",
                "The capital of France is Paris.",
                reference="Paris is the capital of France.",
            ),
            RewardItem("Write a short poem about the sea.", "Waves roll in, silver and slow."),
        ],
    )
    sync_func = adapters.make_reward_func(server_url)
    assert sync_func(prompts, completions, **kwargs) == pytest.approx(expected, abs=1e-6)
    async_func = adapters.make_async_reward_func(server_url)
    assert await async_func(prompts, completions, **kwargs) == pytest.approx(expected, abs=1e-6)


def test_verl_compute_score(server_url: str, monkeypatch: MonkeyPatch) -> None:
    monkeypatch.setenv("R3_URL", server_url)
    monkeypatch.delenv("R3_BACKEND", raising=False)
    query, solution, truth = ITEMS[0].query, ITEMS[0].response, ITEMS[0].reference
    expected = client_scores(server_url, [RewardItem(query, solution, reference=truth)])[0]
    score = adapters.compute_score(
        "alpaca", solution, truth, extra_info={"question": query, "split": "train"}
    )
    assert isinstance(score, float) and math.isfinite(score)
    assert score == pytest.approx(expected, abs=1e-6)
    batch = adapters.compute_score_batch(
        ["alpaca"] * 2,
        [solution, ITEMS[1].response],
        [{"reference": truth, "query_type": "closed"}, None],
        [{"prompt": [{"role": "user", "content": query}]}, {"query": ITEMS[1].query, "qtype": "oe"}],
    )
    assert batch == pytest.approx(client_scores(server_url, ITEMS[:2]), abs=1e-6)
