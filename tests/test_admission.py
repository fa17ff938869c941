"""Admission depends on the request alone: its distinct texts (on a reward model, its distinct
(query, response) pairs), each charged a lower bound of its tokens, held on the queues of the
backend it names. Whatever came before — a smoke test of tiny
texts, long answers, hostile input — a rollout batch the service can clear is queued, and an
overload is refused before any admitted work finishes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import DATA, ServiceProcess, save_tiny_bert, start_service
from r3_service.engine.admission import charge, charge_pairs, demand, words
from r3_service.engine.resolve import RawItem
from r3_service.models.reward_model import RewardModel
from r3_tools.loadgen import history_bodies, make_pairs, post_plain, send_history


def tokens(model, text: str, max_length: int | None = None) -> int:
    """The exact token count of `text` (special tokens included), truncated at `max_length`."""
    ids = model.tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]
    return len(ids)


def dataset_texts() -> list[str]:
    records = json.loads(DATA.read_text())
    return list(dict.fromkeys(text for r in records for text in (r["input"], r["output"]) if text))


# Real text of every kind a rollout or a client sends, and the edges of whitespace splitting.
ODD_TEXTS = [
    "", " ", "\n\n\t", "Four.", "What is 2+2?", "héllo wörld, ça va? naïve café", "我爱自然语言处理 这是测试",
    "مرحبا بالعالم", "Привет, мир!", "🙂🙂🙂 ok 👍🏽", "def f(x):\n    return x ** 2  # square",
    "https://example.com/a/b?c=d&e=f#g", "a" * 500, "word\u200bword next\u200bword", "a\u00a0b\u00a0c",
    "x" * 5000 + " y", "1,234.56 + 7e-3 = ?", "<|im_start|>user\nhi<|im_end|>", "\u200b" * 5000 + "word",
]


def test_the_charge_never_exceeds_the_tokens_of_real_text(embedding_model) -> None:
    """Every text of the shipped data and a spread of odd ones: charged no more tokens than the
    model's tokenizer makes of it (truncated), and on real answers not far below."""
    limit = embedding_model.info.max_length
    ratios = []
    for text in [*dataset_texts(), *ODD_TEXTS]:
        charged = charge([text], embedding_model.info)
        exact = tokens(embedding_model, text, limit)
        assert charged <= exact, (text[:80], charged, exact)
        ratios.append(exact / charged)
    mean = sum(ratios) / len(ratios)
    assert 1.0 <= mean <= 1.6, f"exact/charged tokens: mean {mean:.2f}"


def test_words_never_exceed_the_split_and_match_it_on_ascii_whitespace() -> None:
    """The word count is a lower bound of `str.split()`'s, exact where all whitespace is ASCII:
    a space outside ASCII (U+00A0, U+3000) joins the words on its sides, never splits one."""
    for text in [*dataset_texts(), *ODD_TEXTS, "a\u3000b c", "\ud800 lone surrogate", "x\x1cy\x1fz"]:
        split = len(text.split())
        assert words(text) <= split, text[:80]
        if not any(ch.isspace() and not ch.isascii() for ch in text):
            assert words(text) == split, text[:80]
    assert words("a\u00a0b c") == 2  # split() finds 3


def test_the_charge_is_the_rule_text_by_text(embedding_model) -> None:
    """Short texts are counted joined: the total is exactly each text's min(length, special +
    words), with texts on both sides of the length at which truncation can start."""
    info = embedding_model.info
    edge = 2 * (info.max_length - info.special_tokens)
    texts = [*dataset_texts()[:300], *ODD_TEXTS, "a " * (edge // 2), "a " * (edge // 2 - 1) + "a",
             "ab " * 200, "a " * 400]
    expected = sum(min(info.max_length, info.special_tokens + words(t)) for t in texts)
    assert charge(texts, info) == expected
    assert charge([], info) == 0


def test_a_word_of_deleted_characters_alone_is_the_known_overcount(embedding_model) -> None:
    """The one case the bound does not cover, stated: a whitespace-separated word made only of
    characters the tokenizer deletes (U+200B) is counted as one token it does not produce."""
    text = " ".join(["\u200b"] * 10)
    assert charge([text], embedding_model.info) == tokens(embedding_model, text) + 10


def long_and_short_texts(model, count: int, target: int) -> list[str]:
    """`count` distinct real answers, words joined or cut until each is about `target` tokens."""
    words = " ".join(dataset_texts()).split()
    texts, start = [], 0
    for index in range(count):
        size = target * 3 // 4
        while tokens(model, " ".join(words[start:start + size])) < target:
            size += 8
        texts.append(f"{index} " + " ".join(words[start:start + size]))
        start = (start + size) % (len(words) - 4 * target)
    return texts


def test_a_request_of_500_token_responses_is_charged_about_8x_one_of_64_token_responses(
        embedding_model) -> None:
    """1,024 texts of each length. On a model that reads 512 tokens the charges are in the ratio of
    the texts' tokens (~8). The packaged model reads 256: a long text is charged exactly that,
    what the model reads of it, and a short one no more than its tokens."""
    long_texts = long_and_short_texts(embedding_model, 1024, 500)
    short_texts = long_and_short_texts(embedding_model, 1024, 64)
    longer = replace(embedding_model.info, max_length=512)
    charged = [charge(texts, longer) for texts in (long_texts, short_texts)]
    exact = [sum(tokens(embedding_model, t, 512) for t in texts) for texts in (long_texts, short_texts)]
    ratio, true_ratio = charged[0] / charged[1], exact[0] / exact[1]
    assert 6.5 <= ratio <= 9.5 and abs(ratio / true_ratio - 1) < 0.15, (ratio, true_ratio)

    limit = embedding_model.info.max_length
    assert charge(long_texts, embedding_model.info) == limit * len(long_texts)
    assert charge(short_texts, embedding_model.info) <= exact[1]


def test_a_request_is_charged_by_its_distinct_texts() -> None:
    """A GRPO group's shared query is charged once; a labelled closed item its reference, not its
    query; an unlabelled item its query (to classify it) and any reference it brings."""
    group = [RawItem("Name a prime.", f"{n} is prime.", None, "open") for n in (2, 3, 5, 7)]
    assert demand(group) == {"Name a prime.", "2 is prime.", "3 is prime.", "5 is prime.", "7 is prime."}
    closed = RawItem("Fix: teh cat", "The cat", "The cat.", "closed")
    assert demand([closed]) == {"The cat", "The cat."}
    unknown = RawItem("Fix: teh cat", "The cat", "The cat.", None)
    assert demand([unknown]) == {"Fix: teh cat", "The cat", "The cat."}
    assert demand([*group, closed, unknown]).pairs == {  # what a reward model reads
        ("Name a prime.", f"{n} is prime.") for n in (2, 3, 5, 7)} | {("Fix: teh cat", "The cat")}


# ---------------------------------------------------------------- a reward model reads pairs


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory) -> RewardModel:
    """A sequence classifier (BERT, 512 tokens) with the packaged MiniLM's WordPiece tokenizer."""
    path = save_tiny_bert(tmp_path_factory.mktemp("rm"), "BertForSequenceClassification", num_labels=1)
    return RewardModel(str(path), device="cpu")


def test_a_pair_is_charged_no_more_than_the_tokens_the_reward_model_reads(reward_model: RewardModel) -> None:
    """Every (query, answer) of the shipped data, and odd texts on either side: charged no more than
    the tokens of the pair as the reward model tokenises it (one input, truncated once)."""
    records = json.loads(DATA.read_text())
    real = [(r["input"], r["output"]) for r in records if r["output"]]
    exact, charged = {}, {}
    for pair in [*real, *((a, b) for a in ODD_TEXTS for b in ODD_TEXTS[::3])]:
        exact[pair] = len(reward_model.tokenize([pair])[0])
        charged[pair] = charge_pairs([pair], reward_model.info)
        assert charged[pair] <= exact[pair], (pair[0][:40], pair[1][:40], charged[pair], exact[pair])
    ratio = sum(exact[p] for p in real) / sum(charged[p] for p in real)
    assert 1.0 <= ratio <= 1.6, ratio


def test_a_pair_over_the_length_is_charged_the_length_once(reward_model: RewardModel) -> None:
    """Its query and response each near the model's length: the model reads 512 tokens of the pair,
    and that is the charge; charged text by text it was twice that, above what the model reads."""
    info = reward_model.info
    query, response = "word " * 400, "answer " * 400
    [exact] = reward_model.tokenize([(query, response)])
    assert charge_pairs([(query, response)], info) == len(exact) == info.max_length == 512
    assert charge([query, response], info) == 2 * (400 + info.special_tokens) > len(exact)
    group = demand([RawItem(query, response), RawItem(query, "other " * 400)])
    assert charge_pairs(group.pairs, info) == 2 * 512  # two inputs, one per response


# ---------------------------------------------------------------- every backend, in process


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A deployment whose second backend runs on a model of its own (a tiny BERT), and a third on a
    reward model (another)."""
    from conftest import in_process

    folder = tmp_path_factory.mktemp("two-models")
    tiny = save_tiny_bert(folder / "tiny")
    config = folder / "deployment.yaml"
    reward_model = save_tiny_bert(folder / "rm", "BertForSequenceClassification", num_labels=1)
    config.write_text(yaml.safe_dump({"default_backend": "r3", "backends": {
        "r3": {"kind": "r3", "preset": "r3"},
        "tiny": {"kind": "r3", "preset": "r3", "model": str(tiny)},
        "rm": {"kind": "hf-reward-model", "model": str(reward_model)},
    }}))
    with in_process(config=str(config)) as client:
        yield client


def hog(engine, backend: str | None, tenant: str = ""):
    """An admission past the bound of `backend`'s queue (2,000 texts of the model's full length)."""
    texts = [f"text {i} " + "word " * 600 for i in range(2000)]
    return engine.admit(texts, engine.backend(backend), tenant)


@pytest.mark.parametrize("path, body, params", [
    ("/reward", {"items": [{"query": "q", "response": "r"}], "backend": "tiny"}, {}),
    ("/get_reward", {"query": ["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nr"],
                     "prompts": ["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"],
                     "backend": "tiny"}, {}),
    ("/slime", {"prompt": "q", "response": "r"}, {"backend": "tiny"}),
])
def test_every_backend_is_admitted_on_its_own_queues(two_models, path: str, body: dict, params: dict) -> None:
    engine = two_models.app.state.engine
    held = hog(engine, "tiny")
    try:
        refused = two_models.post(path, json=body, params=params)
        other = {k: v for k, v in body.items() if k != "backend"}
        default = two_models.post(path, json=other)  # the default backend's queue is free
    finally:
        held.release()
    assert refused.status_code == 429, refused.text
    assert "R3_MAX_QUEUE_TOKENS" in refused.json()["detail"] and int(refused.headers["Retry-After"]) >= 1
    assert default.status_code == 200, default.text
    assert two_models.post(path, json=body, params=params).status_code == 200


def test_a_reward_model_queue_holds_the_pairs_and_an_embedding_queue_the_texts(two_models) -> None:
    engine = two_models.app.state.engine
    long = [RawItem("word " * 400, "answer " * 400), RawItem("word " * 400, "other " * 400)]
    for backend, held in (("rm", 2 * 512), ("tiny", 3 * 402)):  # the tiny BERT reads 512 tokens
        admission = engine.admit(demand(long), engine.backend(backend))
        assert admission.tokens == held, backend
        admission.release()


def test_invalid_bodies_keep_their_answers_while_the_queue_is_full(app_client) -> None:
    """A full queue does not turn a 400, 413 or 422 into a 429: the route still answers them."""
    engine = app_client.app.state.engine
    held = hog(engine, None)
    try:
        assert app_client.post("/reward", content=b"{not json", headers={"content-type": "application/json"}
                               ).status_code == 400
        assert app_client.post("/reward", content=b'{"items": []}', headers={"content-type": "text/plain"}
                               ).status_code == 400
        assert app_client.post("/reward", json={"items": [{"query": "q", "respons": "r"}]}).status_code == 422
        assert app_client.post("/reward", json={"items": [{"query": "q", "response": "r"}], "backend": "nope"}
                               ).status_code == 422
        too_many = {"items": [{"query": "q", "response": "r"}] * 5000}
        assert app_client.post("/reward", json=too_many).status_code == 413
        valid = {"items": [{"query": "q", "response": "r"}]}
        assert app_client.post("/reward", json=valid).status_code == 429
    finally:
        held.release()


def test_refusals_are_counted_in_metrics(app_client) -> None:
    """Answered before the routes, a 429 is still counted: per endpoint and status, and as a refusal."""
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> tuple[float, float]:
        families = {f.name: f for f in text_string_to_metric_families(app_client.get("/metrics").text)}
        requests = sum(s.value for s in families["r3_requests"].samples if s.name == "r3_requests_total"
                       and s.labels == {"endpoint": "/reward", "status": "429"})
        return requests, sum(s.value for s in families["r3_queue_rejections"].samples
                             if s.name == "r3_queue_rejections_total")

    engine = app_client.app.state.engine
    before = counts()
    held = hog(engine, None)
    try:
        refused = app_client.post("/reward", json={"items": [{"query": "q", "response": "r"}]})
    finally:
        held.release()
    assert refused.status_code == 429
    assert [after - earlier for after, earlier in zip(counts(), before, strict=True)] == [1, 1]


def test_a_request_without_a_key_is_401_never_429() -> None:
    """Keys are checked before admission: a full queue tells no one without a key anything."""
    from conftest import in_process

    with in_process(api_keys="the-key") as client:
        held = hog(client.app.state.engine, None, "key1")  # the tenant of the key
        try:
            body = {"items": [{"query": "q", "response": "r"}]}
            assert client.post("/reward", json=body).status_code == 401
            keyed = client.post("/reward", json=body, headers={"Authorization": "Bearer the-key"})
            assert keyed.status_code == 429
        finally:
            held.release()


# ---------------------------------------------------------------- a real server, any history


def rollout_bodies(count: int, per_request: int, tag: str) -> list[bytes]:
    """`count` requests of `per_request` labelled real items (~60-word answers), all distinct."""
    pairs = make_pairs(DATA, count * per_request, grouped=False)
    return [json.dumps({"items": [{**p.item(), "query": f"{p.query} [{tag}]"}
                                  for p in pairs[i:i + per_request]]}).encode()
            for i in range(0, len(pairs), per_request)]


# What the queue bound measures on a quiet 2-core CPU (60 s of the packaged model's work), set so
# that the test does not depend on how busy the machine was when the service timed its model.
QUIET_BOUND = "384000"


@pytest.fixture(scope="module")
def fresh_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A default `r3-serve` (in-process store) with the bound a quiet 2-core CPU measures."""
    proc = start_service(tmp_path_factory.mktemp("fresh"), R3_MAX_QUEUE_TOKENS=QUIET_BOUND)
    yield proc
    proc.stop()


def test_after_any_history_a_rollout_batch_is_queued_not_refused(fresh_service: ServiceProcess) -> None:
    """200 requests of tiny texts, then 200 of 5,000-character texts and 200 of a mix, each time
    followed by 16 concurrent 64-item requests from one pooled client, as a trainer sends its
    batch: all 200."""
    fresh = fresh_service
    bound = httpx.get(f"{fresh.url}/v1/info").json()["models"][0]["max_queue_tokens"]

    async def batch(tag: str) -> list[int]:
        async with httpx.AsyncClient(base_url=fresh.url, timeout=300) as client:
            answers = await asyncio.gather(*(client.post("/reward", content=body, headers={
                "content-type": "application/json"}) for body in rollout_bodies(16, 64, tag)))
        return [a.status_code for a in answers]

    for kinds in (("tiny",), ("long", "mix")):
        for kind in kinds:
            assert set(asyncio.run(send_history(fresh.url, history_bodies(kind, 200)))) == {200}
        statuses = asyncio.run(batch(kinds[-1]))
        assert statuses == [200] * 16, f"after {kinds} texts: {statuses} (bound {bound} tokens)"


@pytest.mark.slow
def test_after_any_history_an_overload_is_refused_before_admitted_work_finishes(
        tmp_path: Path) -> None:
    """After long answers and then a security check's hostile requests (one a response of 5,000
    zero-width spaces), 400 concurrent 64-item requests from a plain asyncio client: each gets 200 or
    429 (no 5xx, no timeout), and every 429 comes back before any admitted request is answered —
    refusals wait for no one's work, whatever the service saw before. As a sanity bound relative
    to this machine's own speed (benchmarks measure the speed: `r3-loadtest --history ... --burst
    400`), the median refusal takes less time than scoring one such request alone. (A bound of
    ~20 requests keeps the admitted work short; the history and the burst are the issue's.)"""
    service = start_service(tmp_path, R3_MAX_QUEUE_TOKENS="100000")
    try:
        assert set(asyncio.run(send_history(service.url, history_bodies("long", 64)))) == {200}
        assert set(asyncio.run(send_history(service.url, history_bodies("hostile", 30)))) <= {200, 400, 422}
        [alone_body] = rollout_bodies(1, 64, "alone")
        alone_started = time.perf_counter()
        assert asyncio.run(post_plain(service.url, "/reward", alone_body, timeout=120))[0] == 200
        alone = time.perf_counter() - alone_started
        bodies = rollout_bodies(400, 64, "overload")
        started = time.perf_counter()

        async def timed(body: bytes) -> tuple[int, float]:
            status, headers = await post_plain(service.url, "/reward", body, timeout=120)
            assert status != 429 or int(headers["retry-after"]) >= 1
            return status, time.perf_counter() - started

        async def burst() -> list[tuple[int, float]]:
            return await asyncio.gather(*(timed(body) for body in bodies))

        answers = asyncio.run(burst())
        refused = [seconds for status, seconds in answers if status == 429]
        done = [seconds for status, seconds in answers if status == 200]
        assert len(refused) + len(done) == len(bodies), sorted({s for s, _ in answers})
        assert done and refused
        assert max(refused) < min(done), f"last 429 at {max(refused):.2f} s, first 200 at {min(done):.2f} s"
        median = sorted(refused)[len(refused) // 2]
        assert median < alone, f"median 429 after {median:.2f} s; one request alone takes {alone:.2f} s"
    finally:
        service.stop()
    assert "Traceback" not in service.log.read_text()
