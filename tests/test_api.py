"""The HTTP contract: shapes, errors, limits and configuration. The app runs in this process
(`app_client`, `in_process`); the deployed form, a real r3-serve on Redis, is checked at the end."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message

from conftest import app_settings, in_process, start_service
from r3_service.api.app import create_app
from r3_service.api.middleware import read_body
from r3_service.api.routes import SCORING
from r3_service.rule.reward import PRESETS


@pytest.fixture(scope="module")
def configured_app() -> Iterator[TestClient]:
    """An app with small limits, a chat template and another default preset."""
    with in_process(max_items=5, max_text_chars=1000, max_body_bytes=20000, chat_template="vicuna",
                    default_backend="li-rp", default_query_type="closed", max_rollout_tokens=768,
                    qtype_classifier="none") as client:
        yield client


def test_health_and_readiness(app_client: TestClient) -> None:
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["models"] == [{"model": "packaged:all-MiniLM-L6-v2", "device": "cpu"}]
    assert ready.json()["store"]["kind"] == "memory" and ready.json()["store"]["status"] == "embedded"


def test_until_the_model_is_loaded_readiness_and_scoring_say_so() -> None:
    client = TestClient(create_app(app_settings()))  # not entered: the lifespan, which loads it, has not run
    assert client.get("/healthz").json() == {"status": "ok"}
    loading = "the model is still loading"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json() == {"ready": False, "detail": loading}
    got = client.post("/reward", json={"items": [{"query": "q", "response": "r"}]})
    assert got.status_code == 503 and got.json() == {"detail": loading}


def test_info_reports_the_settings_in_force(app_client: TestClient) -> None:
    info = app_client.get("/v1/info").json()
    assert info["default_backend"] == "r3" and set(info["backends"]) == set(PRESETS)
    r3 = info["backends"]["r3"]
    assert r3["kind"] == "r3" and r3["preset"] == "r3" and r3["model"] == "packaged:all-MiniLM-L6-v2"
    assert r3["normalize"] is True and r3["max_length"] == 256
    # The packaged model's calibrated range (settings.PACKAGED_MODEL_RANGE), not cosine's [0, 1].
    assert r3["relevance_in_range"] == [0.311, 3.622] and r3["relevance_out_range"] == [0.0, 5.12]
    # Every preset that embeds shares the one loaded model; the classifier reads another view of it.
    assert [(m["model"], m["pooling"]) for m in info["models"]] == [
        ("packaged:all-MiniLM-L6-v2", "mean"), ("packaged:all-MiniLM-L6-v2", "layers")]
    assert info["stop_strings"] == ["\n\n\n\n", "\n\n--", "\n\n____"]
    assert info["default_query_type"] == "open" and info["store"] == "memory"
    assert info["query_type_classifier"].startswith("learned@")


def test_info_of_a_configured_service(configured_app: TestClient) -> None:
    info = configured_app.get("/v1/info").json()
    assert info["default_backend"] == "li-rp" and info["default_query_type"] == "closed"
    assert info["backends"]["li-rp"]["relevance_out_range"] == [0.0, 7.68] and info["store"] == "memory"
    assert "USER:" in info["stop_strings"] and "ASSISTANT:" in info["stop_strings"]


def test_rewards_in_item_order_without_components_by_default(app_client: TestClient) -> None:
    items = [{"query": "Say something long.", "response": "word " * n} for n in (1, 30, 5, 60)]
    got = app_client.post("/reward", json={"items": items, "backend": "li"}).json()
    assert got == {"rewards": pytest.approx([0.01, 0.30, 0.05, 0.60]), "backend": "li", "components": None}


def test_every_preset_is_selectable(app_client: TestClient) -> None:
    item = {"query": "Name a fruit.", "response": "An apple is a fruit.", "reference": "Apple.",
            "query_type": "closed"}
    rewards = {}
    for name in PRESETS:
        got = app_client.post("/reward", json={"items": [item], "backend": name, "return_components": True})
        assert got.status_code == 200, got.text
        assert got.json()["backend"] == name
        rewards[name] = got.json()["rewards"][0]
        assert (got.json()["components"][0]["relevance"] is None) == (not PRESETS[name].uses_relevance)
    assert rewards["li"] == pytest.approx(0.06) and rewards["li-rp"] == pytest.approx(0.06)
    assert rewards["lppo"] == pytest.approx(1 - abs(6 / 100 - 1))
    assert rewards["r3"] != rewards["r3-no-branch"]  # closed branch vs the open rule


def test_optional_fields_may_be_null_or_omitted(app_client: TestClient) -> None:
    body = {"items": [{"query": "q", "response": "r", "reference": None, "query_type": None}],
            "backend": None, "return_components": None}
    assert app_client.post("/reward", json=body).status_code == 200
    assert app_client.post("/reward", json={"items": [{"query": "q", "response": "r"}]}).status_code == 200


def test_empty_batches_answer_empty(app_client: TestClient) -> None:
    assert app_client.post("/reward", json={"items": []}).json()["rewards"] == []
    got = app_client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert got.status_code == 200
    assert got.json()["rewards"] == [] and got.json()["scores"] == []
    assert set(got.json()["extra_logs"]) >= {"length_incentive", "repetition_penalty", "relevance"}


@pytest.mark.parametrize("response", [
    "", "   \n\t ", "日本語の回答です。😀 Ünïcödé ✓", "\u200b\u0000\ufeff", "x" * 150_000,
    "word " * 30_000, "!!!???...", "\n\n\n\nonly after the stop string",
])
def test_odd_texts_score_to_finite_numbers(app_client: TestClient, response: str) -> None:
    items = [{"query": q, "response": response, "reference": ref, "query_type": t}
             for q, ref, t in (("Why?", None, "open"), ("日本はどこ？", "Asia.", "closed"), ("", "", None))]
    got = app_client.post("/reward", json={"items": items, "return_components": True})
    assert got.status_code == 200, got.text
    assert all(math.isfinite(r) for r in got.json()["rewards"])


@pytest.mark.parametrize("body,field", [
    ({}, ["body", "items"]),
    ({"items": [{"response": "r"}]}, ["body", "items", 0, "query"]),
    ({"items": [{"query": "q", "response": 5}]}, ["body", "items", 0, "response"]),
    ({"items": "nope"}, ["body", "items"]),
    ({"items": [{"query": "q", "response": "r", "query_type": "sometimes"}]},
     ["body", "items", 0, "query_type"]),
    ({"items": [], "return_components": "maybe"}, ["body", "return_components"]),
])
def test_invalid_reward_requests_get_422_naming_the_field(app_client: TestClient, body: dict,
                                                          field: list) -> None:
    got = app_client.post("/reward", json=body)
    assert got.status_code == 422
    assert field in [error["loc"] for error in got.json()["detail"]]


def test_unknown_backend_lists_the_valid_names(app_client: TestClient) -> None:
    body = {"items": [{"query": "q", "response": "r"}], "backend": "gpt-judge"}
    got = app_client.post("/reward", json=body)
    assert got.status_code == 422
    assert "gpt-judge" in got.json()["detail"] and all(name in got.json()["detail"] for name in PRESETS)


@pytest.mark.parametrize("content,content_type,needle", [
    (b'{"items": [', "application/json", "not valid JSON"),
    (b"items=[]", "application/json", "not valid JSON"),
    ('{"items": [{"query": "caf\u00e9", "response": "r"}]}'.encode("latin-1"), "application/json", "UTF-8"),
    (b'{"items": []}', "application/x-www-form-urlencoded", "Content-Type: application/json"),
    (b'{"items": []}', "text/plain", "Content-Type: application/json"),
])
def test_a_body_that_is_not_json_is_a_400_naming_why(app_client: TestClient, content: bytes,
                                                     content_type: str, needle: str) -> None:
    """Invalid JSON, bytes that are not UTF-8 and a body not sent as JSON: one status, 400."""
    for path in ("/reward", "/get_reward"):
        got = app_client.post(path, content=content, headers={"content-type": content_type})
        assert got.status_code == 400, (path, got.text)
        assert needle in got.json()["detail"]


def test_json_of_the_wrong_shape_is_a_422(app_client: TestClient) -> None:
    for body in (b"[]", b'"items"', b"null"):
        got = app_client.post("/reward", content=body, headers={"content-type": "application/json"})
        assert got.status_code == 422, got.text


@pytest.mark.parametrize("body,field", [
    ({"items": [{"query": "q", "response": "r", "refrence": "typo"}]}, ["body", "items", 0, "refrence"]),
    ({"items": [{"query": "q", "response": "r"}], "return_component": True}, ["body", "return_component"]),
    ({"items": [], "return_components": "yes"}, ["body", "return_components"]),
    ({"items": [], "return_components": 1}, ["body", "return_components"]),
    ({"items": [{"query": "q", "response": "r", "reference": 7}]}, ["body", "items", 0, "reference"]),
])
def test_reward_refuses_unknown_fields_and_coercion(app_client: TestClient, body: dict, field: list) -> None:
    """A misspelt `reference` would silently move a closed query to the open branch."""
    got = app_client.post("/reward", json=body)
    assert got.status_code == 422
    errors = got.json()["detail"]
    assert field in [error["loc"] for error in errors]
    assert all(error["type"] in {"extra_forbidden", "bool_type", "string_type"} for error in errors)


def test_get_reward_ignores_keys_it_does_not_know_and_says_so(app_client: TestClient) -> None:
    prompt = "USER: Name a primary colour. ASSISTANT:"
    body = {"query": [prompt + " Blue."], "prompts": [prompt], "labels": [{"reference": "Blue.", "x": 1}],
            "some_future_openrlhf_key": [1]}
    plain = {"query": [prompt + " Blue."], "prompts": [prompt], "labels": [{"reference": "Blue."}]}
    assert app_client.post("/get_reward", json=body).json()["rewards"] == \
        app_client.post("/get_reward", json=plain).json()["rewards"]
    schema = app_client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["GetRewardRequest"]["additionalProperties"] is True
    assert schema["RewardRequest"]["additionalProperties"] is False
    assert schema["RewardItem"]["additionalProperties"] is False


def test_lone_surrogates_score_as_replacement_characters(app_client: TestClient) -> None:
    """JSON may carry half a UTF-16 surrogate pair, which no encoder accepts: never a 500."""
    raw = b'{"items": [{"query": "\\ud800 lone", "response": "\\udfff x y z", "reference": "\\ud83d"}],' \
          b' "return_components": true}'
    got = app_client.post("/reward", content=raw, headers={"content-type": "application/json"})
    assert got.status_code == 200, got.text
    same = app_client.post("/reward", json={"items": [{"query": "\ufffd lone", "response": "\ufffd x y z",
                                                   "reference": "\ufffd"}], "return_components": True})
    assert got.json() == same.json() and math.isfinite(got.json()["rewards"][0])
    raw = b'{"query": ["USER: \\ud800 hi ASSISTANT: \\udc00 yo"], "labels": ["\\udbff"]}'
    got = app_client.post("/get_reward", content=raw, headers={"content-type": "application/json"})
    assert got.status_code == 200 and math.isfinite(got.json()["rewards"][0])


@pytest.mark.parametrize("page,asset", [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
def test_api_docs_need_no_network(app_client: TestClient, page: str, asset: str) -> None:
    """Every script and style of the docs pages is served by the service itself."""
    html = app_client.get(page).text
    assert f"/docs-assets/{asset}" in html
    assert "http://" not in html and "https://" not in html  # no CDN, no web fonts
    got = app_client.get(f"/docs-assets/{asset}")
    assert got.status_code == 200 and len(got.content) > 100_000


def test_validation_errors_do_not_echo_the_input(app_client: TestClient) -> None:
    secret = "private user text " * 100
    got = app_client.post("/reward", json={"items": [{"query": secret, "response": 12}]})
    assert got.status_code == 422 and "private user text" not in got.text


BLUE = {"query": "Name a primary colour.", "response": "Blue.", "reference": "Blue.", "query_type": "closed"}


@pytest.mark.parametrize("path, body", [
    ("/reward", {"items": [{"query": "q", "response": "r"}], "return_components": True}),
    ("/get_reward", {"query": ["USER: a ASSISTANT: b"]}),
    ("/slime", {"prompt": "q", "response": "r"}),
])
def test_each_body_is_parsed_validated_and_prepared_once(app_client: TestClient, path: str, body: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The admission middleware prepares a scoring body; the route scores what it prepared, and
    FastAPI takes the validated body back instead of reading the JSON again."""
    schema, prepare = SCORING[path]
    prepared = []

    def counted(*args: object) -> object:
        prepared.append(args[0])
        return prepare(*args)  # type: ignore[arg-type]

    async def parsed_again(self: Request) -> None:
        raise AssertionError("FastAPI parsed the body again")

    monkeypatch.setitem(SCORING, path, (schema, counted))
    monkeypatch.setattr(Request, "json", parsed_again)
    got = app_client.post(path, json=body)
    assert got.status_code == 200, got.text
    assert len(prepared) == 1 and isinstance(prepared[0], schema)
    if path == "/reward":
        assert got.json()["components"] is not None  # the route reads the validated body


def test_get_reward_contract(app_client: TestClient) -> None:
    prompt = "USER: Name a primary colour. ASSISTANT:"
    body = {"query": [prompt + " Red is a primary colour.", prompt + " Blue.", prompt + " Yellow."],
            "prompts": [prompt, prompt, prompt],
            "labels": ["Red, yellow and blue.", {"reference": "Blue.", "query_type": "CE"}, None]}
    got = app_client.post("/get_reward", json=body).json()
    assert len(got["rewards"]) == 3 and got["scores"] == got["rewards"]
    assert got["extra_logs"]["length_incentive"] == pytest.approx([0.06, 0.02, 0.02])
    # The first is typed closed by the classifier and has a reference: closed branch; the third
    # has no reference, so it takes the open rule whatever its type.
    assert got["extra_logs"]["closed_branch"] == [1.0, 1.0, 0.0]
    # Same item through /reward gives the same reward: one rule, two contracts.
    direct = app_client.post("/reward", json={"items": [BLUE]})
    assert got["rewards"][1] == pytest.approx(direct.json()["rewards"][0], rel=1e-6)


def test_get_reward_without_prompts_splits_at_the_template(app_client: TestClient) -> None:
    text = "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>"
    got = app_client.post("/get_reward", json={"query": [text], "labels": [{"reference": "Blue.",
                                                                       "query_type": "closed"}]}).json()
    direct = app_client.post("/reward", json={"items": [BLUE]})
    assert got["rewards"][0] == pytest.approx(direct.json()["rewards"][0], rel=1e-6)


@pytest.mark.parametrize("body,needle", [
    ({"query": ["a", "b"], "prompts": ["a"]}, "prompts has 1 entries but query has 2"),
    ({"query": ["a"], "labels": ["x", "y"]}, "labels has 2 entries but query has 1"),
    ({"query": ["plain text"], "prompts": ["other"]}, "prompts[0] is not a prefix of query[0]"),
    ({"query": ["plain text with no template"]}, "query[0]: no prompts given"),
])
def test_get_reward_rejects_inconsistent_batches(app_client: TestClient, body: dict, needle: str) -> None:
    got = app_client.post("/get_reward", json=body)
    assert got.status_code == 422 and needle in got.json()["detail"]


def test_get_reward_label_of_a_wrong_type_is_named(app_client: TestClient) -> None:
    got = app_client.post("/get_reward", json={"query": ["USER: a ASSISTANT: b"], "labels": [3]})
    assert got.status_code == 422
    assert any(error["loc"][:3] == ["body", "labels", 0] for error in got.json()["detail"])


def test_limits_answer_413_with_the_limit(configured_app: TestClient) -> None:
    item = {"query": "q", "response": "r"}
    got = configured_app.post("/reward", json={"items": [item] * 6})
    assert got.status_code == 413 and "limit of 5 items" in got.json()["detail"]
    got = configured_app.post("/reward", json={"items": [item, {"query": "q", "response": "y" * 1001}]})
    assert got.status_code == 413 and "items[1].response" in got.json()["detail"]
    assert "1000" in got.json()["detail"]
    got = configured_app.post("/get_reward", json={"query": ["USER: a ASSISTANT: b"], "labels": ["z" * 1001]})
    assert got.status_code == 413 and "labels[0]" in got.json()["detail"]
    got = configured_app.post("/reward", json={"items": [item] * 5})
    assert got.status_code == 200  # at the limit is fine


def test_body_limit_by_length_and_without_one(configured_app: TestClient) -> None:
    big = b'{"items": [], "pad": "' + b"x" * 30_000 + b'"}'
    got = configured_app.post("/reward", content=big, headers={"content-type": "application/json"})
    assert got.status_code == 413 and "20000 bytes" in got.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        yield b'{"items": [], "pad": "'
        for _ in range(10):
            yield b"x" * 5_000
        yield b'"}'

    got = configured_app.post("/reward", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in got.request.headers
    assert got.status_code == 413 and "R3_MAX_BODY_BYTES" in got.json()["detail"]


async def test_the_body_limit_counts_every_chunk_and_stops_reading_at_the_limit() -> None:
    """The test client hands a streamed body over in one piece; a server, chunk by chunk."""
    chunks = [*({"type": "http.request", "body": b"x" * 5_000, "more_body": True} for _ in range(10)),
              {"type": "http.request", "body": b"", "more_body": False}]
    read: list[Message] = []

    async def receive() -> Message:
        read.append(chunks[len(read)])
        return read[-1]

    with pytest.raises(HTTPException) as refused:
        await read_body({"type": "http", "path": "/reward", "headers": []}, receive, 20_000)
    assert refused.value.status_code == 413 and len(read) == 5  # the chunk that passed it, no more


def test_configured_chat_template_adds_stop_strings(configured_app: TestClient) -> None:
    items = [{"query": "Hi", "response": "Hello there friend USER: now I speak for the user"},
             {"query": "Hi", "response": "Hello there friend"}]
    got = configured_app.post("/reward", json={"items": items, "return_components": True}).json()
    assert got["backend"] == "li-rp"
    assert got["rewards"][0] == pytest.approx(got["rewards"][1]) == pytest.approx(0.03)
    assert got["components"][0]["query_type"] == "closed"  # R3_DEFAULT_QUERY_TYPE
    assert got["components"][0]["query_type_source"] == "default"


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value in Prometheus text (0 when the series does not exist yet)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and sample.labels == labels)


def test_metrics_count_requests_items_and_store(app_client: TestClient) -> None:
    before = app_client.get("/metrics").text
    query = "metrics q never asked before"
    app_client.post("/reward", json={"items": [{"query": query, "response": "metrics r"}] * 3})
    after = app_client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    counted = [metric(after.text, name, **labels) - metric(before, name, **labels)
               for name, labels in [("r3_requests_total", {"endpoint": "/reward", "status": "200"}),
                                    ("r3_requests_total", {"endpoint": "/metrics", "status": "200"}),
                                    ("r3_items_total", {"endpoint": "/reward", "backend": "r3"}),
                                    ("r3_store_lookups_total", {"result": "miss"})]]
    # One request of 3 items, one scrape in between, one lookup of the one distinct query.
    assert counted == [1, 1, 3, 1]
    assert metric(after.text, "r3_request_latency_seconds_count", endpoint="/reward") >= 1
    assert "r3_store_errors_total" in after.text


def test_the_deployed_service_is_ready_on_redis(server_url: str) -> None:
    """r3-serve as deployed: uvicorn, with Redis (R3_REDIS_URL) as its store."""
    assert httpx.get(f"{server_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server_url}/readyz").json()
    assert ready["ready"] is True and ready["store"]["kind"] == "redis"
    assert ready["store"]["status"] == "ok"
    assert httpx.get(f"{server_url}/v1/info").json()["store"] == "redis"


@pytest.mark.slow
def test_invalid_settings_stop_the_service_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="unknown chat template 'zephyr'"):
        start_service(tmp_path, R3_CHAT_TEMPLATE="zephyr")
