"""Query-type classifiers: the rules baseline, the packaged learned head on held-out queries, the llm
kind against a local chat-completions server, `r3-qtype train|eval`, and `r3-qtypes classify` into a
real Redis."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
import redis

from conftest import DATA, ROOT, RedisServer, free_port, start_service
from r3_service.qtype import build_classifier
from r3_service.qtype.base import Label
from r3_service.qtype.learned import HEAD_PATH, HeadMismatch, LearnedClassifier, LinearHead
from r3_service.qtype.llm import PROMPT, LlmClassifier, parse_answer
from r3_service.qtype.rules import RulesClassifier
from r3_service.rule.datasets import read_records
from r3_service.rule.querytypes import QueryType, parse_query_type
from r3_service.settings import DEFAULT_MODEL
from r3_service.store.records import query_key
from r3_service.store.stores import MemoryStore, QueryStore
from r3_tools.heads import model_embedder
from r3_tools.qtype_eval import held_out


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def held_out_rows(dataset: list[dict]) -> tuple[list[str], list[QueryType]]:
    rows = [(r["input"], parse_query_type(r["qtype"])) for r in dataset if held_out(r["input"])]
    return [q for q, _ in rows], [t for _, t in rows]


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    return sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)


# --- rules -------------------------------------------------------------------------------------


async def test_rules_classify_clear_examples() -> None:
    examples: dict[str, QueryType] = {
        "Write a short story about a dragon who is afraid of heights.": "open",
        "Compose a poem about the first snow of winter.": "open",
        "Brainstorm five creative names for a coffee shop.": "open",
        "How can I make a good first impression?": "open",  # the paper's open-ended example
        "How many movies are in the Fast and Furious franchise?": "closed",  # and its closed one
        "What is the capital of France?": "closed",
        "Classify the following animals as mammals or reptiles.\n\n### Input:\nsnake, dog, lizard": "closed",
        "Translate 'good morning' into Spanish.": "closed",
        "Calculate 17 * 4.": "closed",
        "Rewrite the sentence in the passive voice.\n\n### Input:\nThe cat chased the mouse.": "closed",
    }
    classifier = RulesClassifier()
    assert await classifier.classify(list(examples)) == list(examples.values())
    labels = await classifier.label(["Write a poem."])
    assert labels == [Label("open", classifier.id)] and classifier.id.startswith("rules@")


# --- learned ------------------------------------------------------------------------------------


def test_the_head_ships_in_the_package_and_names_its_model() -> None:
    packaged = files("r3_service.qtype") / "qtype_head.json"
    assert packaged.is_file() and Path(str(packaged)) == HEAD_PATH
    head = LinearHead.load()
    assert head.model == DEFAULT_MODEL and head.pooling == "layers" and head.dim == 6 * 384
    assert head.meta["train_queries"] > 1000 and 0.5 < head.meta["strict_cv_accuracy"] < 1
    assert head.meta["augmented"] is True and 0.1 < head.temperature < 10
    assert LinearHead.load().version == head.version  # stable: the store relies on it


async def test_learned_head_agrees_with_gpt4_on_held_out_queries(embedding_model, dataset) -> None:
    """The floor is the head's own strict cross-validated accuracy on the training split (held-out
    leading words, rewritten queries: harder than this random split) less three standard errors
    of a held-out estimate of this size: a trained, loadable, correctly wired head lands above it;
    a broken feature pipeline or a head trained on other embeddings does not."""
    queries, expected = held_out_rows(dataset)
    learned = LearnedClassifier(model_embedder(embedding_model), DEFAULT_MODEL)
    predicted = await learned.classify(queries)
    cv = float(learned.head.meta["strict_cv_accuracy"])
    floor = cv - 3 * math.sqrt(cv * (1 - cv) / len(queries))
    learned_accuracy = accuracy(predicted, expected)
    rules_accuracy = accuracy(await RulesClassifier().classify(queries), expected)
    assert learned_accuracy >= floor, (learned_accuracy, floor)
    assert learned_accuracy > rules_accuracy


async def test_learned_refuses_a_head_of_another_model_and_the_factory_falls_back_to_rules(
        embedding_model, caplog: pytest.LogCaptureFixture) -> None:
    embed = model_embedder(embedding_model)
    with pytest.raises(HeadMismatch, match="facebook/contriever"):
        LearnedClassifier(embed, "facebook/contriever")
    with caplog.at_level(logging.WARNING):
        classifier = build_classifier("learned", embed_for=embed, model_name="facebook/contriever")
    assert isinstance(classifier, RulesClassifier)
    assert "rules baseline instead" in caplog.text
    learned = build_classifier("learned", embed_for=embed, model_name=DEFAULT_MODEL)
    assert isinstance(learned, LearnedClassifier)
    with pytest.raises(ValueError, match="valid: learned, llm, rules"):
        build_classifier("oracle")


async def test_learned_uses_the_injected_embed_function_once_per_batch(embedding_model) -> None:
    calls: list[list[str]] = []
    poolings: list[str] = []
    inner = model_embedder(embedding_model)

    def embed_for(pooling: str):
        poolings.append(pooling)

        async def embed(texts: list[str]):
            calls.append(texts)
            return await inner(pooling)(texts)

        return embed

    learned = LearnedClassifier(embed_for, DEFAULT_MODEL)
    assert poolings == [learned.head.pooling] == ["layers"]  # the view it was trained on, asked once
    # Classifiers take the user's words (the engine removed the template); whitespace is theirs.
    types = await learned.classify(["Write a poem\n\nabout the sea. ", "What is 2 + 2?"])
    assert calls == [["Write a poem about the sea.", "What is 2 + 2?"]]
    assert types == ["open", "closed"]
    assert await learned.classify([]) == [] and len(calls) == 1


async def test_learned_labels_carry_the_probability_their_type_follows(embedding_model) -> None:
    queries = ["Write a poem about the sea.", "What is 2 + 2?", "Summarize the plot of Hamlet."]
    learned = LearnedClassifier(model_embedder(embedding_model), DEFAULT_MODEL)
    labels = await learned.label(queries)
    layers = embedding_model.view("layers").embed(queries)
    expected = learned.head.open_probabilities(queries, layers).tolist()
    assert [label.open_probability for label in labels] == pytest.approx(expected, abs=1e-6)
    assert [label.query_type for label in labels] == ["open" if p > 0.5 else "closed" for p in expected]
    assert all(0 < p < 1 for p in expected) and {label.classified_by for label in labels} == {learned.id}
    # The rules classifier answers without one.
    assert (await RulesClassifier().label(queries[:1]))[0].open_probability is None


# --- llm ----------------------------------------------------------------------------------------

Reply = tuple[int, str, float]  # status, answer text (or raw body for errors), delay in seconds


@dataclass
class ChatServer:
    """A chat-completions endpoint on 127.0.0.1 whose answers come from `reply(query, attempt)`."""

    reply: Callable[[str, int], Reply] = lambda query, attempt: (200, "OPEN-ENDED", 0.0)
    requests: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["content-length"])))
        query = body["messages"][-1]["content"].rsplit("CONVERSATION:\n", 1)[-1]
        with self.lock:
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in handler.headers.items()})
            attempt = self.attempts[query] = self.attempts.get(query, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status, text, delay = self.reply(query, attempt)
            time.sleep(delay)
            payload = (json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                       if status == 200 else text).encode()
            handler.send_response(status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    state = ChatServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            state.handle(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


class StubClassifier(RulesClassifier):
    """A fallback that always says closed, so fallback answers are recognisable."""

    name, version = "stub", "1"

    async def _types(self, queries: Sequence[str]) -> list[QueryType]:
        return ["closed"] * len(queries)


def llm(server: ChatServer, **options: object) -> LlmClassifier:
    settings = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, "concurrency": 4, **options}
    return LlmClassifier(server.url, "judge-7b", fallback=StubClassifier(), **settings)


def test_parse_answer_accepts_only_the_two_tokens() -> None:
    for text, expected in [("OPEN-ENDED", "open"), ("CLOSED-ENDED", "closed"), ("  OPEN-ENDED\n", "open"),
                           ("“CLOSED-ENDED”.", "closed"), ('"OPEN-ENDED"', "open")]:
        assert parse_answer(text) == expected, text
    for junk in ["open-ended", "OPEN", "OPEN-ENDED or CLOSED-ENDED", "Answer: OPEN-ENDED", "",
                 "I think it is CLOSED-ENDED.", "CLOSED-ENDED because it asks for a fact"]:
        assert parse_answer(junk) is None, junk


async def test_llm_sends_the_paper_prompt_and_parses_answers(chat_server: ChatServer) -> None:
    chat_server.reply = lambda q, a: (200, " OPEN-ENDED\n" if "poem" in q else "CLOSED-ENDED", 0.0)
    classifier = LlmClassifier(chat_server.url + "/", "judge-7b", fallback=StubClassifier(),
                               api_key="sk-test-123")
    try:
        labels = await classifier.label(["Write a poem about rain.", "What is the boiling point of water?"])
    finally:
        await classifier.aclose()
    assert labels == [Label("open", classifier.id), Label("closed", classifier.id)]
    assert classifier.id.startswith("llm@") and classifier.stats.fallbacks == 0
    assert all(r["model"] == "judge-7b" and r["temperature"] == 0 for r in chat_server.requests)
    prompts = {r["messages"][0]["content"] for r in chat_server.requests}
    assert PROMPT.format(conversation="Write a poem about rain.") in prompts
    assert PROMPT.startswith("Could you identify whether the last user query of the below conversation")
    assert "relatively anything and creative" in PROMPT and "constrained as a closed form" in PROMPT
    assert all(h["authorization"] == "Bearer sk-test-123" for h in chat_server.headers)


async def test_llm_junk_answers_fall_back_without_retrying(chat_server: ChatServer) -> None:
    answers = {"q1": "OPEN-ENDED", "q2": "open-ended", "q3": "I would say OPEN-ENDED", "q4": ""}
    chat_server.reply = lambda q, a: (200, answers[q], 0.0)
    classifier = llm(chat_server)
    labels = await classifier.label(list(answers))
    await classifier.aclose()
    assert labels == [Label("open", classifier.id)] + [Label("closed", "stub@1")] * 3
    assert classifier.stats.fallbacks == 3 and classifier.stats.retries == 0
    assert len(chat_server.requests) == 4
    assert "authorization" not in chat_server.headers[0]  # no key configured, none sent


async def test_llm_retries_5xx_and_429_then_succeeds(chat_server: ChatServer) -> None:
    statuses = {"flaky": [503, 429], "fine": []}

    def reply(query: str, attempt: int) -> Reply:
        failures = statuses[query]
        return (failures[attempt - 1], "{}", 0.0) if attempt <= len(failures) else (200, "CLOSED-ENDED", 0.0)

    chat_server.reply = reply
    classifier = llm(chat_server)
    labels = await classifier.label(["flaky", "fine"])
    await classifier.aclose()
    assert labels == [Label("closed", classifier.id)] * 2
    assert classifier.stats.retries == 2 and classifier.stats.fallbacks == 0
    assert chat_server.attempts == {"flaky": 3, "fine": 1}


async def test_llm_persistent_errors_and_timeouts_retry_then_fall_back(chat_server: ChatServer) -> None:
    chat_server.reply = lambda q, a: (500, "boom", 0.0) if q == "broken" else (200, "OPEN-ENDED", 1.0)
    classifier = llm(chat_server, timeout_s=0.2, retries=1)
    started = time.perf_counter()
    labels = await classifier.label(["broken", "slow"])
    await classifier.aclose()
    assert labels == [Label("closed", "stub@1")] * 2
    assert chat_server.attempts == {"broken": 2, "slow": 2}  # 1 try + 1 retry each
    assert classifier.stats.fallbacks == 2 and classifier.stats.retries == 2
    assert time.perf_counter() - started < 2.0  # the timeout cut the 1 s answers short


async def test_llm_client_errors_are_not_retried(chat_server: ChatServer) -> None:
    chat_server.reply = lambda q, a: (400, '{"error": "bad model"}', 0.0)
    classifier = llm(chat_server)
    assert await classifier.classify(["anything"]) == ["closed"]
    await classifier.aclose()
    assert chat_server.attempts == {"anything": 1} and classifier.stats.fallbacks == 1


async def test_llm_unreachable_endpoint_falls_back() -> None:
    classifier = LlmClassifier(f"http://127.0.0.1:{free_port()}/v1", "judge-7b", fallback=StubClassifier(),
                               retries=1, backoff_s=0.01, timeout_s=1.0)
    assert await classifier.label(["a", "b"]) == [Label("closed", "stub@1")] * 2
    await classifier.aclose()
    assert classifier.stats.fallbacks == 2 and classifier.stats.requests == 4


async def test_llm_concurrency_is_bounded(chat_server: ChatServer) -> None:
    chat_server.reply = lambda q, a: (200, "CLOSED-ENDED", 0.05)
    classifier = llm(chat_server, concurrency=3)
    assert await classifier.classify([f"query {i}" for i in range(12)]) == ["closed"] * 12
    await classifier.aclose()
    assert 1 < chat_server.max_in_flight <= 3


async def test_llm_factory_falls_back_to_the_learned_head(chat_server: ChatServer, embedding_model) -> None:
    chat_server.reply = lambda q, a: (200, "MAYBE", 0.0)
    classifier = build_classifier("llm", embed_for=model_embedder(embedding_model), model_name=DEFAULT_MODEL,
                                  llm_url=chat_server.url, llm_model="judge-7b", llm_api_key="k")
    labels = await classifier.label(["Write a poem about rain."])
    await classifier.aclose()
    assert labels[0][:2] == ("open", f"learned@{LinearHead.load().version}")
    assert labels[0].open_probability is not None and labels[0].open_probability > 0.5  # the fallback's
    with pytest.raises(ValueError, match="endpoint URL"):
        build_classifier("llm", embed_for=model_embedder(embedding_model), model_name=DEFAULT_MODEL)


# --- r3-qtype train / eval ----------------------------------------------------------------------


@pytest.mark.slow
def test_qtype_eval_prints_the_table_for_each_kind() -> None:
    result = run_module("r3_tools.qtypes", "eval", str(DATA), "--markdown", "--speed-queries", "200")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "419 queries, held-out split (1 in 5 by query key) (of 2000 labelled)" in lines[0]
    assert lines[1].startswith("| kind | accuracy | open P / R | closed P / R |")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[3:5]}
    assert set(rows) == {"learned", "rules"}
    assert float(rows["learned"].rstrip("%")) > float(rows["rules"].rstrip("%")) > 60


@pytest.mark.slow
def test_qtype_eval_of_the_llm_kind_counts_fallbacks(chat_server: ChatServer, dataset: list[dict]) -> None:
    chat_server.reply = lambda q, a: (200, "CLOSED-ENDED" if "?" not in q else "no idea", 0.0)
    result = run_module("r3_tools.qtypes", "eval", str(DATA), "--kind", "llm", "--llm-url",
                        chat_server.url, "--llm-model", "judge-7b", "--speed-queries", "20")
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[2].split()
    junk = [query for query in held_out_rows(dataset)[0] if "?" in query]
    assert row[0] == "llm" and int(row[-1]) == len(junk) > 0  # fallbacks on the held-out queries


@pytest.mark.slow
def test_qtype_train_writes_a_head_that_eval_loads(tmp_path: Path, dataset: list[dict]) -> None:
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(json.dumps({"query": r["input"], "query_type": r["qtype"]})
                               for r in dataset[:300]) + "\n")
    head_path = tmp_path / "head.json"
    result = run_module("r3_tools.qtypes", "train", str(small), "--out", str(head_path),
                        "--folds", "2", "--l2", "0.1", "0.3")
    assert result.returncode == 0, result.stderr
    assert "grouped 2-fold cross-validation" in result.stdout and "l2=0.3: strict accuracy" in result.stdout
    head = LinearHead.load(head_path)
    trained = sum(not held_out(r["input"]) for r in dataset[:300])
    assert head.meta["train_queries"] == trained and head.meta["l2"] in (0.1, 0.3)
    assert head.meta["data_sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()
    assert head.temperature != 1.0 and head.meta["augmented"] is True
    assert head.version != LinearHead.load().version
    result = run_module("r3_tools.qtypes", "eval", str(small), "--kind", "learned", "--head",
                        str(head_path), "--speed-queries", "0")
    assert result.returncode == 0, result.stderr
    assert f"learned@{head.version}" in result.stdout
    assert f"{300 - trained} queries, held-out split" in result.stdout  # its own training file
    other = tmp_path / "other.jsonl"  # any other file was never trained on: all of it counts
    other.write_text("\n".join(json.dumps({"query": r["input"], "query_type": r["qtype"]})
                               for r in dataset[300:360]) + "\n")
    result = run_module("r3_tools.qtypes", "eval", str(other), "--kind", "learned", "--head",
                        str(head_path), "--speed-queries", "0")
    assert result.returncode == 0, result.stderr
    assert "60 queries, all rows (not the head's training file)" in result.stdout


# --- r3-qtypes classify -------------------------------------------------------------------------


def test_classify_writes_types_with_classifier_ids_to_redis_and_skips_them_next_time(
        redis_server: RedisServer, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]  # the session's Redis is shared with other tests
    rows = [{"query": f"Write a poem about the sea ({tag})."},
            {"instruction": f"What is the capital of Peru? ({tag})", "output": "Lima."},
            {"query": f"Compose a song about friendship ({tag}).", "query_type": "closed"},
            {"input": f"Translate 'thank you' into French ({tag}).", "reference": "Merci."}]
    path = tmp_path / "unlabelled.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    learned_id = f"learned@{LinearHead.load().version}"

    result = run_module("r3_tools.qtypes", "classify", str(path), "--redis-url", redis_server.url,
                        "--out", str(tmp_path / "typed.jsonl"))
    assert result.returncode == 0, result.stderr
    assert f"classified 3 queries with {learned_id}; skipped 0" in result.stdout
    assert "classified 3/3 (100%)" in result.stderr  # the progress line
    queries = [r.get("query") or r.get("instruction") or r["input"] for r in rows]
    stored = [client.hgetall(query_key(query)) for query in queries]
    assert [s["query_type"] for s in stored] == ["open", "closed", "closed", "closed"]
    assert [s.get("classified_by") for s in stored] == [learned_id, learned_id, None, learned_id]
    assert stored[1]["reference"] == "Lima." and stored[3]["reference"] == "Merci."
    # The learned answers carry p(open), consistent with their type; the dataset's label none.
    opens = [float(s["open_probability"]) > 0.5 for s in (stored[0], stored[1], stored[3])]
    assert opens == [True, False, False]
    assert "open_probability" not in stored[2]
    typed, errors = read_records(tmp_path / "typed.jsonl")
    assert not errors and [r.classified_by for _, r in typed] == [learned_id, learned_id, None, learned_id]

    again = run_module("r3_tools.qtypes", "classify", str(path), "--redis-url", redis_server.url)
    assert again.returncode == 0, again.stderr
    assert f"classified 0 queries with {learned_id}; skipped 3 already typed" in again.stdout
    assert client.hgetall(query_key(rows[0]["query"])) == stored[0]

    # another classifier (version) does not trust the learned answers; authoritative labels win
    rules = run_module("r3_tools.qtypes", "classify", str(path), "--redis-url", redis_server.url,
                       "--kind", "rules")
    assert "classified 3 queries with rules@" in rules.stdout and "skipped 0" in rules.stdout
    # A hard answer does not inherit the learned head's probability.
    assert "open_probability" not in client.hgetall(query_key(queries[1]))
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"query": rows[0]["query"], "qtype": "CONSTRAINED"}) + "\n")
    assert run_module("r3_tools.qtypes", "load", str(labelled), "--redis-url",
                      redis_server.url).returncode == 0
    assert client.hgetall(query_key(rows[0]["query"])) == {"query": rows[0]["query"], "query_type": "closed"}


async def test_the_service_store_reads_the_classifier_id_back(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    key = query_key(f"Describe a sunset ({uuid.uuid4().hex[:8]}).")
    client.hset(key, mapping={"query": "q", "query_type": "open", "classified_by": "learned@abc"})
    store = QueryStore(MemoryStore(16), redis_server.url, timeout_s=1.0)
    try:
        [record] = await store.get_many([key])
    finally:
        await store.close()
    assert record is not None and (record.query_type, record.classified_by) == ("open", "learned@abc")


@pytest.mark.slow
def test_classify_needs_somewhere_to_write(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"query": "Write a poem."}) + "\n")
    result = subprocess.run([sys.executable, "-m", "r3_tools.qtypes", "classify", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k != "R3_REDIS_URL"})
    assert result.returncode == 2 and "nowhere to write" in result.stderr



# --- in the service: request → store → classifier → default, answers written back to Redis ------


def reward_sources(url: str, items: list[dict], backend: str | None = None) -> list[tuple[str, str]]:
    got = httpx.post(f"{url}/reward", json={"items": items, "backend": backend, "return_components": True},
                     timeout=60)
    assert got.status_code == 200, got.text
    return [(c["query_type"], c["query_type_source"]) for c in got.json()["components"]]


async def test_service_classifies_unknown_queries_and_writes_them_back(
        server_url: str, redis_server: RedisServer, embedding_model) -> None:
    tag = uuid.uuid4().hex[:8]
    poem, sums = f"Write a poem about a lighthouse keeper's cat ({tag}).", f"What is 17 + 25? ({tag})"
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    current = httpx.get(f"{server_url}/v1/info", timeout=10).json()["query_type_classifier"]
    learned = LearnedClassifier(model_embedder(embedding_model), DEFAULT_MODEL)
    assert current == learned.id
    expected = await learned.classify([poem, sums])

    items = [{"query": poem, "response": "Waves."}, {"query": sums, "response": "42."}]
    assert reward_sources(server_url, items) == [(t, "classifier") for t in expected]
    for query, label in zip((poem, sums), await learned.label([poem, sums]), strict=True):
        stored = client.hgetall(query_key(query))
        assert float(stored.pop("open_probability")) == pytest.approx(label.open_probability, abs=1e-5)
        assert stored == {"query": query, "query_type": label.query_type, "classified_by": current}

    # A stale version's answer is replaced; a dataset's label (no classifier id) is never touched.
    stale, labelled = f"Name three primary colours ({tag}).", f"Describe your ideal weekend ({tag})."
    client.hset(query_key(stale), mapping={"query": stale, "query_type": "open", "reference": "Red.",
                                           "classified_by": "learned@000000000000"})
    client.hset(query_key(labelled), mapping={"query": labelled, "query_type": "closed"})
    fresh = (await learned.classify([stale]))[0]
    got = reward_sources(server_url, [{"query": stale, "response": "Red, yellow, blue."},
                                      {"query": labelled, "response": "Hiking."}])
    assert got == [(fresh, "classifier"), ("closed", "cache")]
    stored = client.hgetall(query_key(stale))
    assert 0 <= float(stored.pop("open_probability")) <= 1
    assert stored == {"query": stale, "query_type": fresh, "reference": "Red.", "classified_by": current}
    assert "classified_by" not in client.hgetall(query_key(labelled))


def test_backends_blind_to_the_type_do_not_classify(server_url: str, redis_server: RedisServer) -> None:
    query = f"Tell me about the moon ({uuid.uuid4().hex[:8]})."
    assert reward_sources(server_url, [{"query": query, "response": "It orbits."}], backend="li") == [
        ("open", "default")]
    assert not redis.Redis.from_url(redis_server.url).exists(query_key(query))


@pytest.mark.slow
def test_service_with_the_llm_classifier(chat_server: ChatServer, tmp_path: Path) -> None:
    chat_server.reply = lambda query, attempt: (
        (200, "CLOSED-ENDED", 0.0) if "capital" in query else (200, "OPEN-ENDED", 0.0))
    proc = start_service(tmp_path, R3_QTYPE_CLASSIFIER="llm", R3_QTYPE_LLM_URL=chat_server.url,
                         R3_QTYPE_LLM_MODEL="judge-7b", R3_QTYPE_LLM_API_KEY="sk-test")
    try:
        info = httpx.get(f"{proc.url}/v1/info", timeout=10).json()
        assert info["query_type_classifier"].startswith("llm@")
        items = [{"query": "What is the capital of Peru?", "response": "Lima."},
                 {"query": "Invent a bedtime story.", "response": "Once upon a time."}]
        assert reward_sources(proc.url, items) == [("closed", "classifier"), ("open", "classifier")]
        assert {r["model"] for r in chat_server.requests} == {"judge-7b"}
        assert all(h["authorization"] == "Bearer sk-test" for h in chat_server.headers)
        asked = len(chat_server.requests)
        assert reward_sources(proc.url, items) == [("closed", "classifier"), ("open", "classifier")]
        assert len(chat_server.requests) == asked  # answered from the store, not asked again
        metrics = httpx.get(f"{proc.url}/metrics", timeout=10).text
        assert f"r3_qtype_llm_requests_total {float(asked)}" in metrics
        assert 'r3_qtype_llm_queries_total{answered_by="endpoint"} 2.0' in metrics
        assert 'r3_qtype_llm_queries_total{answered_by="fallback"} 0.0' in metrics
    finally:
        proc.stop()


@pytest.mark.slow
def test_llm_classifier_needs_its_endpoint(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="R3_QTYPE_LLM_URL"):
        start_service(tmp_path, R3_QTYPE_CLASSIFIER="llm")
