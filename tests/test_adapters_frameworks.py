"""Trainer adapters driven with the exact call shape each framework makes, against the live service
(`server_url`), a closed port (service down) and a local server that answers 429 + Retry-After once.

Call shapes, from the frameworks' sources:
- TRL: `reward_func(prompts=..., completions=..., completion_ids=..., **columns)`, None -> NaN
  (trl/trainer/grpo_trainer.py `_calculate_rewards`).
- verl reward loop: `await compute_score(data_source=, solution_str=, ground_truth=, extra_info=,
  reward_model=..., reward_model_tokenizer=...)` (verl/experimental/reward/reward_loop/naive.py).
- OpenRLHF: the file loaded with `spec_from_file_location("reward_func", path)`, then
  `reward_func(queries, prompts, labels)` (openrlhf/utils/agent.py).
- AReaL: `reward_fn(prompt_str, completions_str, input_tokens, output_tokens, **data)`, through a
  process pool (areal/workflow/rlvr.py, areal/api/reward_api.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port
from r3_client import adapters

CLIENT = ROOT / "client" / "r3_client"
QUERY = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
REFERENCE = "Paris is the capital of France."


@pytest.fixture
def down_url() -> str:
    """A closed port on 127.0.0.1: the service is down."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("R3_URL", "R3_BACKEND", "R3_BACKENDS", "R3_API_KEY", "R3_ON_FAILURE", "R3_DEADLINE_S"):
        monkeypatch.delenv(name, raising=False)


def direct(url: str, items: list[dict], **extra: object) -> dict:
    answer = httpx.post(f"{url}/reward", json={"items": items, **extra}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def load_by_path(path: Path, name: str):
    """What verl and OpenRLHF do with a reward file: import it by path, outside any package."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- a 429 once, then answers


class Busy429Once(BaseHTTPRequestHandler):
    """Answers the first POST with 429 + Retry-After: 1, then valid bodies for /reward and
    /get_reward (one reward per item), recording when each request came."""

    hits: list[float]

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).hits.append(time.monotonic())
        if len(type(self).hits) == 1:
            self._send(429, {"detail": "busy"}, {"Retry-After": "1"})
            return
        n = len(body["items"]) if self.path == "/reward" else len(body["query"])
        component = {"length_incentive": 0.5, "repetition_penalty": 0.0, "query_type": "closed",
                     "query_type_source": "request", "relevance": 0.25, "relevance_target": "reference"}
        if self.path == "/reward":
            self._send(200, {"rewards": [0.75] * n, "backend": "r3", "components": [component] * n})
        else:
            self._send(200, {"rewards": [0.75] * n, "scores": [0.75] * n,
                             "extra_logs": {"length_incentive": [0.5] * n}})

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def busy_once() -> Iterator[tuple[str, list[float]]]:
    handler = type("Handler", (Busy429Once,), {"hits": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


def call_trl(url: str, mp: pytest.MonkeyPatch) -> object:
    return adapters.make_reward_func(url)(prompts=[QUERY], completions=[ANSWER], completion_ids=[[1]])


def call_trl_async(url: str, mp: pytest.MonkeyPatch) -> object:
    func = adapters.make_async_reward_func(url)
    return asyncio.run(func(prompts=[QUERY], completions=[ANSWER], completion_ids=[[1]]))


def call_verl(url: str, mp: pytest.MonkeyPatch) -> object:
    mp.setenv("R3_URL", url)
    return adapters.compute_score("alpaca", ANSWER, REFERENCE, {"question": QUERY, "index": 0})


def call_verl_async(url: str, mp: pytest.MonkeyPatch) -> object:
    mp.setenv("R3_URL", url)
    return asyncio.run(adapters.compute_score_async(
        data_source="alpaca", solution_str=ANSWER, ground_truth=REFERENCE,
        extra_info={"question": QUERY, "index": 0}, reward_model=None, reward_model_tokenizer=None))


def call_openrlhf(url: str, mp: pytest.MonkeyPatch) -> object:
    mp.setenv("R3_URL", url)
    reward_func = load_by_path(CLIENT / "openrlhf_reward.py", "reward_func").reward_func
    prompt = f"USER: {QUERY} ASSISTANT:"
    return reward_func([f"{prompt} {ANSWER}</s>"], [prompt], [REFERENCE])


def call_areal(url: str, mp: pytest.MonkeyPatch) -> object:
    mp.setenv("R3_URL", url)
    return adapters.areal_reward_fn("<|im_start|>user\n...", ANSWER + "<|im_end|>", [1, 2], [3],
                                    messages=[{"role": "user", "content": QUERY}], answer=REFERENCE,
                                    query_id="q7")


CALLS: dict[str, Callable[[str, pytest.MonkeyPatch], object]] = {
    "trl": call_trl, "trl_async": call_trl_async, "verl": call_verl, "verl_async": call_verl_async,
    "openrlhf": call_openrlhf, "areal": call_areal,
}


@pytest.mark.slow  # waits out a real Retry-After of one second per framework
@pytest.mark.parametrize("framework", list(CALLS))
def test_429_retry_after_is_waited_for_then_succeeds(
    framework: str, busy_once: tuple[str, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, hits = busy_once
    result = CALLS[framework](url, monkeypatch)
    assert len(hits) == 2 and hits[1] - hits[0] >= 0.95  # Retry-After: 1 was honoured
    rewards = result["rewards"] if isinstance(result, dict) and "rewards" in result else result
    if isinstance(result, dict) and "score" in result:
        rewards = result["score"]
    flat = rewards.tolist() if hasattr(rewards, "tolist") else rewards
    assert flat in (0.75, [0.75])


# --------------------------------------------------------------------------- service down


@pytest.mark.parametrize("framework", list(CALLS))
def test_service_down_raises_by_default(
    framework: str, down_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("R3_DEADLINE_S", "0.2")
    before = adapters.failure_count()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="r3_client.adapters"), \
            pytest.raises(adapters.RewardUnavailable) as caught:
        CALLS[framework](down_url, monkeypatch)
    assert time.monotonic() - started < 5  # the deadline, not 5 retries of exponential backoff
    message = str(caught.value)
    assert down_url in message and "ConnectError" in message and "deadline" in message
    assert caught.value.url == down_url and len(caught.value.items) == 1
    assert adapters.failure_count() == before + 1
    assert any(down_url in record.getMessage() for record in caplog.records)
    expected_id = {"verl": "data_source=alpaca index=0", "verl_async": "data_source=alpaca index=0",
                   "openrlhf": "queries[0]", "areal": "query_id=q7"}.get(framework, "completions[0]")
    assert caught.value.items == [expected_id] and expected_id in message


@pytest.mark.parametrize("framework", ["trl", "trl_async", "openrlhf"])
def test_service_down_with_on_failure_none_gives_no_reward(
    framework: str, down_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("R3_DEADLINE_S", "0.2")
    monkeypatch.setenv("R3_ON_FAILURE", "none")
    before = adapters.failure_count()
    with caplog.at_level(logging.WARNING, logger="r3_client.adapters"):
        result = CALLS[framework](down_url, monkeypatch)
    assert result == ([None] if framework.startswith("trl") else None)  # never 0.0
    assert adapters.failure_count() == before + 1
    assert any("no reward from" in record.getMessage() for record in caplog.records)


def test_trl_factory_argument_wins_over_the_environment(
    down_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("R3_ON_FAILURE", "none")
    func = adapters.make_reward_func(down_url, on_failure="raise", deadline_s=0.3)
    with pytest.raises(adapters.RewardUnavailable):
        func(prompts=[QUERY], completions=[ANSWER])
    assert adapters.make_reward_func(down_url, on_failure="none", deadline_s=0.3)(
        prompts=[QUERY, QUERY], completions=[ANSWER, ANSWER]) == [None, None]
    with pytest.raises(ValueError, match="on_failure must be one of"):
        adapters.make_reward_func(down_url, on_failure="zero")  # type: ignore[arg-type]


@pytest.mark.parametrize("framework", ["verl", "verl_async", "areal"])
def test_none_is_refused_where_the_framework_has_no_no_reward_value(
    framework: str, down_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("R3_ON_FAILURE", "none")
    with pytest.raises(ValueError, match="has no 'no reward' value"):
        CALLS[framework](down_url, monkeypatch)
    with pytest.raises(ValueError, match="AReaL"):
        adapters.AReaLRewardFn(down_url, on_failure="none")


# --------------------------------------------------------------------------- live service


def test_verl_reward_loop_async_returns_score_and_components(
    server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl's reward loop imports the file by path and awaits the coroutine per sample."""
    monkeypatch.setenv("R3_URL", server_url)
    monkeypatch.setenv("R3_BACKENDS", json.dumps({"alpaca_novel": "r3-novel"}))
    module = load_by_path(CLIENT / "verl_reward.py", "custom_module")
    assert asyncio.iscoroutinefunction(module.compute_score_async)
    extra = {"question": QUERY, "index": 3, "split": "train"}

    async def run_loop() -> list[dict]:  # as RewardLoopWorker.compute_score_batch: one task per sample
        return await asyncio.gather(*[
            module.compute_score_async(data_source=source, solution_str=ANSWER, ground_truth=REFERENCE,
                                       extra_info=extra, reward_model=None, reward_model_tokenizer=None)
            for source in ("alpaca", "alpaca_novel")])

    default, novel = asyncio.run(run_loop())
    item = {"query": QUERY, "response": ANSWER, "reference": REFERENCE}
    expected = direct(server_url, [item], return_components=True)
    expected_novel = direct(server_url, [item], backend="r3-novel")
    assert set(default) == set(novel) == {"score", "length_incentive", "repetition_penalty", "relevance",
                                          "closed_branch"}
    assert default["score"] == pytest.approx(expected["rewards"][0], abs=1e-6)
    assert novel["score"] == pytest.approx(expected_novel["rewards"][0], abs=1e-6)
    component = expected["components"][0]
    assert default["length_incentive"] == pytest.approx(component["length_incentive"])
    assert default["relevance"] == pytest.approx(component["relevance"])
    assert default["closed_branch"] == 1.0  # a reference was given: the closed branch
    # the synchronous functions (older reward managers) pick the same backends
    assert module.compute_score("alpaca_novel", ANSWER, REFERENCE, extra) == pytest.approx(novel["score"])
    assert module.compute_score_batch(["alpaca", "alpaca_novel"], [ANSWER] * 2, [REFERENCE] * 2,
                                      [extra] * 2) == pytest.approx([default["score"], novel["score"]])
    # the config mapping (custom_reward_function.reward_kwargs.backends) wins over R3_BACKENDS
    assert module.compute_score("alpaca_novel", ANSWER, REFERENCE, extra,
                                backends={"alpaca_novel": "r3"}) == pytest.approx(default["score"])


def test_verl_query_from_raw_prompt_or_refused(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R3_URL", server_url)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUERY}]
    result = asyncio.run(adapters.compute_score_async("alpaca", ANSWER, REFERENCE, {"index": 1},
                                                      raw_prompt=chat))
    assert result["score"] == pytest.approx(direct(server_url, [
        {"query": QUERY, "response": ANSWER, "reference": REFERENCE}])["rewards"][0], abs=1e-6)
    with pytest.raises(adapters.MissingQuery, match="raw_prompt"):
        asyncio.run(adapters.compute_score_async("alpaca", ANSWER, REFERENCE, {"index": 1}))
    with pytest.raises(ValueError, match="R3_BACKENDS"):
        monkeypatch.setenv("R3_BACKENDS", "{not json")
        adapters.compute_score("alpaca", ANSWER, REFERENCE, {"question": QUERY})


def test_openrlhf_file_is_one_request_and_matches_get_reward(
    server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("R3_URL", server_url)
    reward_func = load_by_path(CLIENT / "openrlhf_reward.py", "reward_func").reward_func
    prompts = [f"USER: {QUERY} ASSISTANT:", "<|im_start|>user\nWrite a limerick about a cat.<|im_end|>\n"
               "<|im_start|>assistant\n", f"USER: {QUERY} ASSISTANT:"]
    queries = [prompts[0] + " " + ANSWER + "</s>", prompts[1] + "There once was a cat from Peru.<|im_end|>",
               prompts[2] + " Lyon."]
    labels = [REFERENCE, None, {"reference": REFERENCE, "query_type": "closed"}]
    before = requests_to(server_url, "/get_reward")
    result = reward_func(queries, prompts, labels)
    assert requests_to(server_url, "/get_reward") - before == 1  # the whole batch in one request
    expected = httpx.post(f"{server_url}/get_reward", timeout=60,
                          json={"query": queries, "prompts": prompts, "labels": labels}).json()
    assert isinstance(result["rewards"], torch.Tensor) and result["rewards"].shape == (3,)
    assert result["rewards"].tolist() == pytest.approx(expected["rewards"], abs=1e-5)
    assert result["scores"].tolist() == pytest.approx(expected["scores"], abs=1e-5)
    assert set(result["extra_logs"]) == set(expected["extra_logs"])
    assert result["extra_logs"]["length_incentive"].tolist() == pytest.approx(
        expected["extra_logs"]["length_incentive"], abs=1e-5)


def requests_to(url: str, endpoint: str) -> float:
    """Requests the service has answered on `endpoint` (its Prometheus counter)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("r3_requests_total{") and f'endpoint="{endpoint}"' in line)


def test_areal_reward_fn_scores_and_pickles(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R3_URL", server_url)
    data = {"messages": [{"role": "user", "content": QUERY}], "answer": REFERENCE, "query_id": "q1"}
    templated = f"<|im_start|>user\n{QUERY}<|im_end|>\n<|im_start|>assistant\n"
    reward = adapters.areal_reward_fn(templated, ANSWER + "<|im_end|>", [1, 2, 3], [4, 5], **data)
    item = {"query": QUERY, "response": ANSWER, "reference": REFERENCE}
    expected = direct(server_url, [item])["rewards"][0]
    assert isinstance(reward, float) and reward == pytest.approx(expected, abs=1e-6)
    # AsyncRewardWrapper sends the function to a process pool: it must pickle
    func = pickle.loads(pickle.dumps(adapters.AReaLRewardFn(server_url, backend="r3-novel")))
    novel = func(templated, ANSWER, [1], [2], **data)
    assert novel == pytest.approx(direct(server_url, [item], backend="r3-novel")["rewards"][0])
    with pytest.raises(adapters.MissingQuery, match="messages"):
        adapters.areal_reward_fn(templated, ANSWER, [1], [2], answer=REFERENCE)


def test_trl_reward_func_call_shape_live(server_url: str) -> None:
    func = adapters.make_reward_func(server_url, deadline_s=30)
    rewards = func(prompts=[[{"role": "user", "content": QUERY}]], completions=[[{"role": "assistant",
                   "content": ANSWER}]], completion_ids=[[1, 2]], reference=[REFERENCE], trainer_state=None)
    expected = direct(server_url, [{"query": QUERY, "response": ANSWER, "reference": REFERENCE}])["rewards"]
    assert rewards == pytest.approx(expected, abs=1e-6)
