"""slime's remote reward model (`--rm-type remote_rm --rm-url http://HOST:PORT/slime`): one
{prompt, response, label} body per sample, the JSON answer taken as the reward (a bare number, or
`answer[reward_key]` with `--reward-key`). See r3_service/api/slime.py for the contract."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from fastapi.testclient import TestClient

from r3_service.api.schemas import Components
from r3_service.rule.templates import TEMPLATES

CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def chatml(query: str, system: bool = False) -> str:
    """What slime's --apply-chat-template makes of a query for a ChatML (Qwen) tokenizer."""
    return f"{CHATML_SYSTEM if system else ''}<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"


def slime_reward(client: TestClient, body: dict, **params: str) -> float:
    answer = client.post("/slime", json=body, params=params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"  # aiohttp's resp.json() insists
    value = answer.json()
    assert isinstance(value, float)
    return value


def direct_reward(client: TestClient, item: dict, backend: str | None = None) -> float:
    answer = client.post("/reward", json={"items": [item], "backend": backend})
    assert answer.status_code == 200, answer.text
    return answer.json()["rewards"][0]


CLOSED = {"query": "What is 2+2?", "response": "2 + 2 = 4, so the answer is 4.",
          "reference": "The answer is 4.", "query_type": "closed"}
OPEN = {"query": "Write a haiku about autumn.",
        "response": "Red leaves drift and fall, cold wind whispers through bare trees, the year exhales."}


@pytest.mark.parametrize(("label", "item"), [
    (None, OPEN),
    ("The answer is 4.", {**CLOSED, "query_type": None}),
    ({"reference": "The answer is 4.", "query_type": "closed"}, CLOSED),
    ({"reference": None, "query_type": "open"}, {**OPEN, "query_type": "open"}),
    ({"query_type": "ce", "reference": "The answer is 4."}, CLOSED),
], ids=["null", "string", "object", "object-open", "object-alias"])
def test_the_bare_number_is_rewards_reward_for_the_same_item(app_client: TestClient, label, item) -> None:
    body = {"prompt": item["query"], "response": item["response"], "label": label}
    assert slime_reward(app_client, body) == pytest.approx(direct_reward(app_client, item), abs=1e-6)


@pytest.mark.parametrize("system", [False, True])
def test_a_chatml_prompt_scores_as_its_plain_query(app_client: TestClient, system: bool) -> None:
    label = {"reference": "4", "query_type": "closed"}
    plain = slime_reward(app_client, {"prompt": "What is 2+2?", "response": "2 + 2 = 4.", "label": label})
    templated = slime_reward(app_client, {"prompt": chatml("What is 2+2?", system),
                                          "response": "2 + 2 = 4.", "label": label})
    assert templated == pytest.approx(plain, abs=1e-6)
    item = {"query": "What is 2+2?", "response": "2 + 2 = 4.", "reference": "4", "query_type": "closed"}
    assert plain == pytest.approx(direct_reward(app_client, item), abs=1e-6)
    # A response that runs on past the end of its turn is cut at the template's role prefixes.
    ran_on = slime_reward(app_client, {
        "prompt": chatml("What is 2+2?", system), "label": label,
        "response": "2 + 2 = 4.<|im_end|>\n<|im_start|>user\nThanks! Now 3+3?"})
    assert ran_on == pytest.approx(plain, abs=1e-6)


@pytest.mark.parametrize("name", ["llama-3", "glm-4", "deepseek"])
def test_the_templates_slime_models_use_score_as_the_plain_query(app_client: TestClient, name: str) -> None:
    template = TEMPLATES[name]
    label = {"reference": "The answer is 4.", "query_type": "closed"}
    plain = slime_reward(app_client, {"prompt": "What is 2+2?", "response": "2 + 2 = 4.", "label": label})
    prompt = template.prompt("What is 2+2?", system="You are a helpful assistant.")
    templated = slime_reward(app_client, {"prompt": prompt, "response": "2 + 2 = 4.", "label": label})
    assert templated == pytest.approx(plain, abs=1e-6)
    ran_on = slime_reward(app_client, {"prompt": prompt, "label": label,
                                       "response": "2 + 2 = 4." + template.stop_strings[0] + "Now 3+3?"})
    assert ran_on == pytest.approx(plain, abs=1e-6)


@pytest.mark.parametrize("encoded", [
    json.dumps({"reference": "The answer is 4.", "query_type": "closed"}),  # a label json.dumps'ed
    str({"reference": "The answer is 4.", "query_type": "closed"}),  # pandas' dtype=str of a JSON object
], ids=["json", "python-repr"])
def test_a_label_object_in_a_string_is_read_as_the_object(app_client: TestClient, encoded: str) -> None:
    """slime reads JSONL labels with `dtype={"label": str}`: an object label arrives as a string."""
    body = {"prompt": CLOSED["query"], "response": CLOSED["response"]}
    assert slime_reward(app_client, {**body, "label": encoded}) == pytest.approx(
        direct_reward(app_client, CLOSED), abs=1e-6)


def test_a_string_that_is_not_a_label_object_stays_a_reference(app_client: TestClient) -> None:
    for reference in ("{1, 2, 3}", "{x: 1}", "{'answer': 4}"):
        body = {"prompt": CLOSED["query"], "response": CLOSED["response"], "label": reference}
        item = {**CLOSED, "reference": reference, "query_type": None}
        assert slime_reward(app_client, body) == pytest.approx(direct_reward(app_client, item), abs=1e-6)


def test_nan_is_no_label(app_client: TestClient) -> None:
    """pandas' missing label: Python's json.dumps (aiohttp's json=) writes it as a bare NaN."""
    raw = json.dumps({"prompt": OPEN["query"], "response": OPEN["response"], "label": math.nan})
    assert "NaN" in raw
    answer = app_client.post("/slime", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == pytest.approx(slime_reward(app_client, {"prompt": OPEN["query"],
                                                                     "response": OPEN["response"]}), abs=1e-6)


def test_components_answer_the_reward_and_every_component(app_client: TestClient) -> None:
    body = {"prompt": chatml(CLOSED["query"]), "response": CLOSED["response"],
            "label": {"reference": CLOSED["reference"], "query_type": "closed"}}
    answer = app_client.post("/slime", json=body, params={"components": "true"})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert set(got) == {"reward", *Components.model_fields}
    assert got["reward"] == pytest.approx(slime_reward(app_client, body), abs=1e-6)
    expected = app_client.post("/reward", json={"items": [CLOSED], "return_components": True}).json()
    assert got == {"reward": pytest.approx(expected["rewards"][0], abs=1e-6),
                   **{k: pytest.approx(v, abs=1e-6) if isinstance(v, float) else v
                      for k, v in expected["components"][0].items()}}
    assert got["query_type_source"] == "request" and got["relevance_target"] == "reference"
    assert isinstance(app_client.post("/slime", json=body, params={"components": "false"}).json(), float)


def test_backend_picks_one_as_reward_does(app_client: TestClient) -> None:
    body = {"prompt": OPEN["query"], "response": OPEN["response"]}
    assert slime_reward(app_client, body, backend="li") == pytest.approx(
        direct_reward(app_client, OPEN, backend="li"), abs=1e-6)
    answer = app_client.post("/slime", json=body, params={"backend": "no-such-backend"})
    assert answer.status_code == 422
    assert "no-such-backend" in answer.json()["detail"] and "r3" in answer.json()["detail"]


def error_locations(answer: httpx.Response) -> list[list]:
    assert answer.status_code == 422, answer.text
    return [e["loc"] for e in answer.json()["detail"]]


def test_bad_bodies_are_422s_naming_the_field(app_client: TestClient) -> None:
    assert error_locations(app_client.post("/slime", json={"prompt": "a"})) == [["body", "response"]]
    assert error_locations(app_client.post("/slime", json={"response": "a"})) == [["body", "prompt"]]
    # slime sends only prompt, response and label: anything else is a mistake, said so.
    assert error_locations(app_client.post("/slime", json={"prompt": "a", "response": "b", "metadata": {}})) \
        == [["body", "metadata"]]
    assert ["body", "prompt"] in error_locations(app_client.post("/slime", json={
        "prompt": [{"role": "user", "content": "a"}], "response": "b"}))
    assert all(loc[:2] == ["body", "label"] for loc in error_locations(app_client.post("/slime", json={
        "prompt": "a", "response": "b", "label": 3})))
    assert all(loc[:2] == ["body", "label"] for loc in error_locations(app_client.post("/slime", json={
        "prompt": "a", "response": "b", "label": {"reference": "x", "query_type": "sometimes"}})))
    assert all(loc[:2] == ["body", "label"] for loc in error_locations(app_client.post("/slime", json={
        "prompt": "a", "response": "b", "label": "{'reference': 'x', 'query_type': 'sometimes'}"})))


def test_an_unknown_query_parameter_is_a_422_naming_it(app_client: TestClient) -> None:
    """A misspelt ?backend= must not silently score on the default backend."""
    answer = app_client.post("/slime", json={"prompt": "a", "response": "b"}, params={"backen": "li"})
    assert answer.status_code == 422 and "'backen'" in answer.json()["detail"]
    answer = app_client.post("/slime", json={"prompt": "a", "response": "b"}, params={"components": "maybe"})
    assert error_locations(answer) == [["query", "components"]]


def test_what_is_not_json_is_a_400(app_client: TestClient) -> None:
    answer = app_client.post("/slime", content=b"prompt=a&response=b",
                             headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["detail"]
    answer = app_client.post("/slime", content=b'{"prompt": "a", "response": "b"}',
                             headers={"content-type": "text/plain"})
    assert answer.status_code == 400 and "Content-Type: application/json" in answer.json()["detail"]


def test_over_the_length_limit_is_a_413_naming_the_field() -> None:
    from conftest import in_process

    with in_process(max_text_chars=1000) as client:
        answer = client.post("/slime", json={"prompt": "a", "response": "b", "label": "z" * 1001})
        assert answer.status_code == 413 and "label" in answer.json()["detail"]
        answer = client.post("/slime", json={"prompt": "a", "response": "y" * 1001})
        assert answer.status_code == 413 and "response" in answer.json()["detail"]


def test_a_full_queue_is_a_429_with_retry_after(app_client: TestClient) -> None:
    engine = app_client.app.state.engine  # type: ignore[attr-defined]
    texts = [f"text {i} " + "word " * 300 for i in range(2000)]  # each a model's full length of tokens
    hog = engine.admit(texts, engine.backend(None))  # past the bound
    try:
        answer = app_client.post("/slime", json={"prompt": "a", "response": "b"})
    finally:
        hog.release()
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1
    assert "R3_MAX_QUEUE_TOKENS" in answer.json()["detail"]
    assert app_client.post("/slime", json={"prompt": "a", "response": "b"}).status_code == 200


# --- a real server (uvicorn, Redis store) ---------------------------------------------------------


def rollout(dataset: list[dict], count: int) -> list[tuple[dict, dict]]:
    """(slime body, the same /reward item): templated prompts and every label form."""
    samples = []
    for index, row in enumerate(dataset[:count]):
        response = dataset[(index * 7 + 3) % len(dataset)]["output"] if index % 3 == 0 else row["output"]
        qtype = "closed" if row["qtype"] == "CONSTRAINED" else "open"
        labels = [(None, None, None), (row["output"], row["output"], None),
                  ({"reference": row["output"], "query_type": qtype}, row["output"], qtype),
                  (json.dumps({"query_type": qtype}), None, qtype)]
        label, reference, query_type = labels[index % len(labels)]
        prompt = chatml(row["input"], system=index % 2 == 1) if index % 4 != 3 else row["input"]
        samples.append(({"prompt": prompt, "response": response, "label": label},
                        {"query": row["input"], "response": response, "reference": reference,
                         "query_type": query_type}))
    return samples


def forward_passes(server_url: str) -> float:
    text = httpx.get(f"{server_url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("r3_batch_size_count"))


def test_64_concurrent_samples_score_as_one_reward_call(server_url: str, dataset: list[dict]) -> None:
    """slime's 64 connections at once, one sample each: all answered, batched together by the
    engine, each reward that of the same item in one /reward call."""
    samples = rollout(dataset, 64)
    before = forward_passes(server_url)

    async def all_at_once() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post("/slime", json=body) for body, _ in samples))

    answers = asyncio.run(all_at_once())
    assert [a.status_code for a in answers] == [200] * 64, [a.text for a in answers if a.status_code != 200]
    passes = forward_passes(server_url) - before
    assert passes < 64, f"{passes} forward passes for 64 concurrent samples: not batched"
    together = httpx.post(f"{server_url}/reward", json={"items": [item for _, item in samples]}, timeout=120)
    assert together.status_code == 200, together.text
    assert [a.json() for a in answers] == pytest.approx(together.json()["rewards"], abs=1e-6)
    metrics = httpx.get(f"{server_url}/metrics").text
    assert 'r3_requests_total{endpoint="/slime",status="200"}' in metrics
    assert 'r3_items_total{backend="r3",endpoint="/slime"}' in metrics


async def slime_remote_rm(session, url: str, sample: dict, reward_key: str | None) -> float:
    """slime's remote_rm and Sample.get_reward_value: POST json={"prompt", "response", "label"},
    raise for status, take resp.json() whole as the reward, then [reward_key] if one is given."""
    payload = {"prompt": sample["prompt"], "response": sample["response"], "label": sample["label"]}
    async with session.post(url, json=payload) as resp:
        resp.raise_for_status()
        reward = await resp.json()
    return reward if not reward_key else reward[reward_key]


@pytest.mark.parametrize("reward_key", [None, "reward"])
def test_slimes_own_client_shape(server_url: str, dataset: list[dict], reward_key: str | None) -> None:
    """The request exactly as slime builds it: aiohttp, one shared session of 64 connections and a
    120 s timeout, `--rm-url` with or without `?components=true` for `--reward-key reward`."""
    aiohttp = pytest.importorskip("aiohttp")
    samples = rollout(dataset[64:], 16)
    url = f"{server_url}/slime" + ("?components=true" if reward_key else "")

    async def rollout_rewards() -> list[float]:
        connector = aiohttp.TCPConnector(limit=64, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            calls = [slime_remote_rm(session, url, body, reward_key) for body, _ in samples]
            return await asyncio.gather(*calls)

    rewards = asyncio.run(rollout_rewards())
    assert all(isinstance(r, float) for r in rewards)
    expected = httpx.post(f"{server_url}/reward", json={"items": [item for _, item in samples]}, timeout=120)
    assert rewards == pytest.approx(expected.json()["rewards"], abs=1e-6)
