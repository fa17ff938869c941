"""The HTTP contract of a real r3-serve process: shapes, errors, limits and configuration."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import ServiceProcess, start_service
from r3_service.rule.reward import PRESETS


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service with small limits, a chat template and another default preset."""
    proc = start_service(tmp_path_factory.mktemp("configured"), R3_MAX_ITEMS="5",
                         R3_MAX_TEXT_CHARS="1000", R3_MAX_BODY_BYTES="20000",
                         R3_CHAT_TEMPLATE="vicuna", R3_DEFAULT_BACKEND="li-rp",
                         R3_DEFAULT_QUERY_TYPE="closed", R3_MAX_ROLLOUT_TOKENS="768",
                         R3_QTYPE_CLASSIFIER="none")
    yield proc
    proc.stop()


def post(url: str, path: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120, **kwargs)


def test_health_and_readiness(server_url: str) -> None:
    assert httpx.get(f"{server_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server_url}/readyz").json()
    assert ready["ready"] is True and ready["store"]["kind"] == "redis"
    assert ready["store"]["status"] == "ok"


def test_info_reports_the_settings_in_force(server_url: str) -> None:
    info = httpx.get(f"{server_url}/v1/info").json()
    assert info["default_backend"] == "r3" and set(info["backends"]) == set(PRESETS)
    r3 = info["backends"]["r3"]
    assert r3["kind"] == "r3" and r3["preset"] == "r3" and r3["model"] == "packaged:all-MiniLM-L6-v2"
    assert r3["normalize"] is True and r3["max_length"] == 256
    assert r3["relevance_in_range"] == [0.0, 1.0] and r3["relevance_out_range"] == [0.0, 5.12]
    # Every preset that embeds shares the one loaded model.
    assert [m["model"] for m in info["models"]] == ["packaged:all-MiniLM-L6-v2"]
    assert info["stop_strings"] == ["\n\n\n\n", "\n\n--", "\n\n____"]
    assert info["default_query_type"] == "open" and info["store"] == "redis"


def test_info_of_a_configured_service(configured: ServiceProcess) -> None:
    info = httpx.get(f"{configured.url}/v1/info").json()
    assert info["default_backend"] == "li-rp" and info["default_query_type"] == "closed"
    assert info["backends"]["li-rp"]["relevance_out_range"] == [0.0, 7.68] and info["store"] == "memory"
    assert "USER:" in info["stop_strings"] and "ASSISTANT:" in info["stop_strings"]


def test_rewards_in_item_order_without_components_by_default(server_url: str) -> None:
    items = [{"query": "Say something long.", "response": "word " * n} for n in (1, 30, 5, 60)]
    got = post(server_url, "/reward", {"items": items, "backend": "li"}).json()
    assert got == {"rewards": pytest.approx([0.01, 0.30, 0.05, 0.60]), "backend": "li", "components": None}


def test_every_preset_is_selectable(server_url: str) -> None:
    item = {"query": "Name a fruit.", "response": "An apple is a fruit.", "reference": "Apple.",
            "query_type": "closed"}
    rewards = {}
    for name in PRESETS:
        got = post(server_url, "/reward", {"items": [item], "backend": name, "return_components": True})
        assert got.status_code == 200, got.text
        assert got.json()["backend"] == name
        rewards[name] = got.json()["rewards"][0]
        assert (got.json()["components"][0]["relevance"] is None) == (not PRESETS[name].uses_relevance)
    assert rewards["li"] == pytest.approx(0.06) and rewards["li-rp"] == pytest.approx(0.06)
    assert rewards["lppo"] == pytest.approx(1 - abs(6 / 100 - 1))
    assert rewards["r3"] != rewards["r3-no-branch"]  # closed branch vs the open rule


def test_optional_fields_may_be_null_or_omitted(server_url: str) -> None:
    body = {"items": [{"query": "q", "response": "r", "reference": None, "query_type": None}],
            "backend": None, "return_components": None}
    assert post(server_url, "/reward", body).status_code == 200
    assert post(server_url, "/reward", {"items": [{"query": "q", "response": "r"}]}).status_code == 200


def test_empty_batches_answer_empty(server_url: str) -> None:
    assert post(server_url, "/reward", {"items": []}).json()["rewards"] == []
    got = post(server_url, "/get_reward", {"query": [], "prompts": [], "labels": []})
    assert got.status_code == 200
    assert got.json()["rewards"] == [] and got.json()["scores"] == []
    assert set(got.json()["extra_logs"]) >= {"length_incentive", "repetition_penalty", "relevance"}


@pytest.mark.parametrize("response", [
    "", "   \n\t ", "日本語の回答です。😀 Ünïcödé ✓", "\u200b\u0000\ufeff", "x" * 150_000,
    "word " * 30_000, "!!!???...", "\n\n\n\nonly after the stop string",
])
def test_odd_texts_score_to_finite_numbers(server_url: str, response: str) -> None:
    items = [{"query": q, "response": response, "reference": ref, "query_type": t}
             for q, ref, t in (("Why?", None, "open"), ("日本はどこ？", "Asia.", "closed"), ("", "", None))]
    got = post(server_url, "/reward", {"items": items, "return_components": True})
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
def test_invalid_reward_requests_get_422_naming_the_field(server_url: str, body: dict, field: list) -> None:
    got = post(server_url, "/reward", body)
    assert got.status_code == 422
    assert field in [error["loc"] for error in got.json()["detail"]]


def test_unknown_backend_lists_the_valid_names(server_url: str) -> None:
    got = post(server_url, "/reward", {"items": [{"query": "q", "response": "r"}], "backend": "gpt-judge"})
    assert got.status_code == 422
    assert "gpt-judge" in got.json()["detail"] and all(name in got.json()["detail"] for name in PRESETS)


@pytest.mark.parametrize("content,content_type,needle", [
    (b'{"items": [', "application/json", "not valid JSON"),
    (b"items=[]", "application/json", "not valid JSON"),
    ('{"items": [{"query": "caf\u00e9", "response": "r"}]}'.encode("latin-1"), "application/json", "UTF-8"),
    (b'{"items": []}', "application/x-www-form-urlencoded", "Content-Type: application/json"),
    (b'{"items": []}', "text/plain", "Content-Type: application/json"),
])
def test_a_body_that_is_not_json_is_a_400_naming_why(server_url: str, content: bytes, content_type: str,
                                                     needle: str) -> None:
    """Invalid JSON, bytes that are not UTF-8 and a body not sent as JSON: one status, 400."""
    for path in ("/reward", "/get_reward"):
        got = httpx.post(f"{server_url}{path}", content=content, timeout=30,
                         headers={"content-type": content_type})
        assert got.status_code == 400, (path, got.text)
        assert needle in got.json()["detail"]


def test_json_of_the_wrong_shape_is_a_422(server_url: str) -> None:
    for body in (b"[]", b'"items"', b"null"):
        got = httpx.post(f"{server_url}/reward", content=body, headers={"content-type": "application/json"})
        assert got.status_code == 422, got.text


@pytest.mark.parametrize("body,field", [
    ({"items": [{"query": "q", "response": "r", "refrence": "typo"}]}, ["body", "items", 0, "refrence"]),
    ({"items": [{"query": "q", "response": "r"}], "return_component": True}, ["body", "return_component"]),
    ({"items": [], "return_components": "yes"}, ["body", "return_components"]),
    ({"items": [], "return_components": 1}, ["body", "return_components"]),
    ({"items": [{"query": "q", "response": "r", "reference": 7}]}, ["body", "items", 0, "reference"]),
])
def test_reward_refuses_unknown_fields_and_coercion(server_url: str, body: dict, field: list) -> None:
    """A misspelt `reference` would silently move a closed query to the open branch."""
    got = post(server_url, "/reward", body)
    assert got.status_code == 422
    errors = got.json()["detail"]
    assert field in [error["loc"] for error in errors]
    assert all(error["type"] in {"extra_forbidden", "bool_type", "string_type"} for error in errors)


def test_get_reward_ignores_keys_it_does_not_know_and_says_so(server_url: str) -> None:
    prompt = "USER: Name a primary colour. ASSISTANT:"
    body = {"query": [prompt + " Blue."], "prompts": [prompt], "labels": [{"reference": "Blue.", "x": 1}],
            "some_future_openrlhf_key": [1]}
    plain = {"query": [prompt + " Blue."], "prompts": [prompt], "labels": [{"reference": "Blue."}]}
    assert post(server_url, "/get_reward", body).json()["rewards"] == \
        post(server_url, "/get_reward", plain).json()["rewards"]
    schema = httpx.get(f"{server_url}/openapi.json").json()["components"]["schemas"]
    assert schema["GetRewardRequest"]["additionalProperties"] is True
    assert schema["RewardRequest"]["additionalProperties"] is False
    assert schema["RewardItem"]["additionalProperties"] is False


def test_lone_surrogates_score_as_replacement_characters(server_url: str) -> None:
    """JSON may carry half a UTF-16 surrogate pair, which no encoder accepts: never a 500."""
    raw = b'{"items": [{"query": "\\ud800 lone", "response": "\\udfff x y z", "reference": "\\ud83d"}],' \
          b' "return_components": true}'
    got = httpx.post(f"{server_url}/reward", content=raw, headers={"content-type": "application/json"},
                     timeout=60)
    assert got.status_code == 200, got.text
    same = post(server_url, "/reward", {"items": [{"query": "\ufffd lone", "response": "\ufffd x y z",
                                                   "reference": "\ufffd"}], "return_components": True})
    assert got.json() == same.json() and math.isfinite(got.json()["rewards"][0])
    raw = b'{"query": ["USER: \\ud800 hi ASSISTANT: \\udc00 yo"], "labels": ["\\udbff"]}'
    got = httpx.post(f"{server_url}/get_reward", content=raw, headers={"content-type": "application/json"})
    assert got.status_code == 200 and math.isfinite(got.json()["rewards"][0])


@pytest.mark.parametrize("page,asset", [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
def test_api_docs_need_no_network(server_url: str, page: str, asset: str) -> None:
    """Every script and style of the docs pages is served by the service itself."""
    html = httpx.get(f"{server_url}{page}").text
    assert f"/docs-assets/{asset}" in html
    assert "http://" not in html and "https://" not in html  # no CDN, no web fonts
    got = httpx.get(f"{server_url}/docs-assets/{asset}")
    assert got.status_code == 200 and len(got.content) > 100_000


def test_validation_errors_do_not_echo_the_input(server_url: str) -> None:
    secret = "private user text " * 100
    got = post(server_url, "/reward", {"items": [{"query": secret, "response": 12}]})
    assert got.status_code == 422 and "private user text" not in got.text


def test_get_reward_contract(server_url: str) -> None:
    prompt = "USER: Name a primary colour. ASSISTANT:"
    body = {"query": [prompt + " Red is a primary colour.", prompt + " Blue.", prompt + " Yellow."],
            "prompts": [prompt, prompt, prompt],
            "labels": ["Red, yellow and blue.", {"reference": "Blue.", "query_type": "CE"}, None]}
    got = post(server_url, "/get_reward", body).json()
    assert len(got["rewards"]) == 3 and got["scores"] == got["rewards"]
    assert got["extra_logs"]["length_incentive"] == pytest.approx([0.06, 0.02, 0.02])
    # The first is typed closed by the classifier and has a reference: closed branch; the third
    # has no reference, so it takes the open rule whatever its type.
    assert got["extra_logs"]["closed_branch"] == [1.0, 1.0, 0.0]
    # Same item through /reward gives the same reward: one rule, two contracts.
    direct = post(server_url, "/reward", {"items": [{"query": "Name a primary colour.", "response": "Blue.",
                                                     "reference": "Blue.", "query_type": "closed"}]})
    assert got["rewards"][1] == pytest.approx(direct.json()["rewards"][0], rel=1e-6)


def test_get_reward_without_prompts_splits_at_the_template(server_url: str) -> None:
    text = "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>"
    got = post(server_url, "/get_reward", {"query": [text], "labels": [{"reference": "Blue.",
                                                                       "query_type": "closed"}]}).json()
    direct = post(server_url, "/reward", {"items": [{"query": "Name a primary colour.", "response": "Blue.",
                                                     "reference": "Blue.", "query_type": "closed"}]})
    assert got["rewards"][0] == pytest.approx(direct.json()["rewards"][0], rel=1e-6)


@pytest.mark.parametrize("body,needle", [
    ({"query": ["a", "b"], "prompts": ["a"]}, "prompts has 1 entries but query has 2"),
    ({"query": ["a"], "labels": ["x", "y"]}, "labels has 2 entries but query has 1"),
    ({"query": ["plain text"], "prompts": ["other"]}, "prompts[0] is not a prefix of query[0]"),
    ({"query": ["plain text with no template"]}, "query[0]: no prompts given"),
])
def test_get_reward_rejects_inconsistent_batches(server_url: str, body: dict, needle: str) -> None:
    got = post(server_url, "/get_reward", body)
    assert got.status_code == 422 and needle in got.json()["detail"]


def test_get_reward_label_of_a_wrong_type_is_named(server_url: str) -> None:
    got = post(server_url, "/get_reward", {"query": ["USER: a ASSISTANT: b"], "labels": [3]})
    assert got.status_code == 422
    assert any(error["loc"][:3] == ["body", "labels", 0] for error in got.json()["detail"])


def test_limits_answer_413_with_the_limit(configured: ServiceProcess) -> None:
    url = configured.url
    item = {"query": "q", "response": "r"}
    got = post(url, "/reward", {"items": [item] * 6})
    assert got.status_code == 413 and "limit of 5 items" in got.json()["detail"]
    got = post(url, "/reward", {"items": [item, {"query": "q", "response": "y" * 1001}]})
    assert got.status_code == 413 and "items[1].response" in got.json()["detail"]
    assert "1000" in got.json()["detail"]
    got = post(url, "/get_reward", {"query": ["USER: a ASSISTANT: b"], "labels": ["z" * 1001]})
    assert got.status_code == 413 and "labels[0]" in got.json()["detail"]
    got = post(url, "/reward", {"items": [item] * 5})
    assert got.status_code == 200  # at the limit is fine


def test_body_limit_by_length_and_while_streaming(configured: ServiceProcess) -> None:
    big = b'{"items": [], "pad": "' + b"x" * 30_000 + b'"}'
    got = httpx.post(f"{configured.url}/reward", content=big, headers={"content-type": "application/json"})
    assert got.status_code == 413 and "20000 bytes" in got.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        yield b'{"items": [], "pad": "'
        for _ in range(10):
            yield b"x" * 5_000
        yield b'"}'

    got = httpx.post(f"{configured.url}/reward", content=chunks(),
                     headers={"content-type": "application/json"})
    assert got.status_code == 413 and "R3_MAX_BODY_BYTES" in got.json()["detail"]


def test_configured_chat_template_adds_stop_strings(configured: ServiceProcess) -> None:
    items = [{"query": "Hi", "response": "Hello there friend USER: now I speak for the user"},
             {"query": "Hi", "response": "Hello there friend"}]
    got = post(configured.url, "/reward", {"items": items, "return_components": True}).json()
    assert got["backend"] == "li-rp"
    assert got["rewards"][0] == pytest.approx(got["rewards"][1]) == pytest.approx(0.03)
    assert got["components"][0]["query_type"] == "closed"  # R3_DEFAULT_QUERY_TYPE
    assert got["components"][0]["query_type_source"] == "default"


def test_metrics_count_requests_items_and_store(server_url: str) -> None:
    post(server_url, "/reward", {"items": [{"query": "metrics q", "response": "metrics r"}] * 3})
    text = httpx.get(f"{server_url}/metrics").text
    assert 'r3_requests_total{endpoint="/reward",status="200"}' in text
    assert 'r3_items_total{backend="r3",endpoint="/reward"}' in text
    assert "r3_request_latency_seconds_bucket" in text
    assert 'r3_store_lookups_total{result="miss"}' in text and "r3_store_errors_total" in text


@pytest.mark.slow
def test_invalid_settings_stop_the_service_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="unknown chat template 'zephyr'"):
        start_service(tmp_path, R3_CHAT_TEMPLATE="zephyr")
