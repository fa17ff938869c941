"""Security: API keys, log hygiene, loopback binding, and hostile bodies answered as documented.

API keys (`R3_API_KEYS=k1,k2`): clients send `Authorization: Bearer KEY`; /healthz and /readyz
stay open for orchestrators; everything else, /metrics, /openapi.json and /docs included, is a
401 with a JSON `detail` and `WWW-Authenticate: Bearer` without a valid key."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import DATA, ServiceProcess, free_port, in_process, start_service
from r3_client import R3HTTPError, RewardClient
from r3_tools.loadgen import Target, Workload, closed_loop, make_pairs, parse_mix, start_server

KEYS = ("key-one-0123456789", "key-two-abcdefghij")
ITEM = {"query": "What is the capital of France?", "response": "Paris is the capital of France."}
GET_REWARD = {"query": ["USER: Name a colour. ASSISTANT: Red."],
              "prompts": ["USER: Name a colour. ASSISTANT:"]}
PROTECTED = [("POST", "/reward", {"items": [ITEM]}), ("POST", "/get_reward", GET_REWARD),
             ("GET", "/metrics", None), ("GET", "/v1/info", None), ("GET", "/openapi.json", None),
             ("GET", "/docs", None)]


@pytest.fixture(scope="module")
def keyed_app() -> Iterator[TestClient]:
    """An app with API keys, in this process."""
    with in_process(api_keys=",".join(KEYS)) as client:
        yield client


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A real r3-serve with API keys, for the clients that reach it over the network."""
    proc = start_service(tmp_path_factory.mktemp("keyed"), R3_API_KEYS=",".join(KEYS))
    yield proc
    proc.stop()


def call(client: TestClient, method: str, path: str, body: dict | None, key: str | None = None,
         scheme: str = "Bearer") -> httpx.Response:
    headers = {"Authorization": f"{scheme} {key}".strip()} if key is not None else {}
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_without_a_valid_key_everything_but_health_is_401(keyed_app: TestClient, method: str, path: str,
                                                          body: dict | None) -> None:
    for key, scheme in ((None, "Bearer"), ("wrong-key", "Bearer"), (KEYS[0][:-1], "Bearer"),
                        (KEYS[0], "Basic"), ("", "Bearer")):
        got = call(keyed_app, method, path, body, key, scheme)
        assert got.status_code == 401, (key, scheme, got.status_code)
        assert got.headers.get("www-authenticate", "").startswith("Bearer")
        assert isinstance(got.json()["detail"], str)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_any_configured_key_opens_everything(keyed_app: TestClient, method: str, path: str,
                                             body: dict | None) -> None:
    for key in KEYS:
        assert call(keyed_app, method, path, body, key).status_code == 200


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_key_in_basic_credentials_opens_everything(keyed_app: TestClient) -> None:
    """The key as the password (or as the user name alone): what an HTTP library sends for a URL
    like `http://r3:KEY@HOST/slime`, for clients such as slime that send no headers of their own."""
    slime_body = {"prompt": "Name a colour.", "response": "Red."}
    for credentials in (basic("r3", KEYS[0]), basic(KEYS[1], ""), basic("", KEYS[0])):
        assert call(keyed_app, "POST", "/slime", slime_body, credentials, "Basic").status_code == 200
        assert call(keyed_app, "POST", "/reward", {"items": [ITEM]}, credentials, "Basic").status_code == 200
    for credentials in (basic("r3", "wrong"), basic(KEYS[0][:-1], ""), basic("r3", ""), "%%%"):
        assert call(keyed_app, "POST", "/slime", slime_body, credentials, "Basic").status_code == 401


def test_health_and_readiness_stay_open_for_orchestrators(keyed_app: TestClient) -> None:
    assert keyed_app.get("/healthz").status_code == 200
    assert keyed_app.get("/readyz").status_code == 200


def test_client_and_load_generator_send_the_key(keyed: ServiceProcess) -> None:
    with RewardClient(keyed.url, api_key=KEYS[1]) as client:
        assert len(client.score([ITEM, ITEM])) == 2
    with RewardClient(keyed.url, max_retries=0) as client, pytest.raises(R3HTTPError) as refused:
        client.score([ITEM])
    assert refused.value.status == 401  # not retried: a 4xx other than 429

    workload = Workload(parse_mix("1:0.5,openrlhf:0.5"), make_pairs(DATA, 16, grouped=False))
    keyed_run = asyncio.run(closed_loop(Target(keyed.url, headers={"Authorization": f"Bearer {KEYS[0]}"}),
                                        workload, 2, 1.0))
    assert keyed_run.outcomes and keyed_run.errors == 0
    anonymous = asyncio.run(closed_loop(Target(keyed.url), workload, 2, 0.5))
    assert {o.status for o in anonymous.outcomes} == {401}


def test_slime_authenticates_with_the_key_in_its_url_and_the_key_is_never_shown(
        keyed: ServiceProcess) -> None:
    """slime posts with aiohttp to `--rm-url` as given and sends no headers: with the key in the
    URL's credentials it is scored (aiohttp sends them as `Authorization: Basic`), and the key
    appears in neither the service's log, its metrics nor `/v1/info`."""
    import aiohttp

    host = keyed.url.removeprefix("http://")
    body = {"prompt": "Name a colour.", "response": "Red.", "label": "Red"}

    async def post(url: str) -> tuple[int, object]:
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
            return answer.status, await answer.json()

    status, reward = asyncio.run(post(f"http://r3:{KEYS[0]}@{host}/slime"))
    assert status == 200 and isinstance(reward, float)
    assert asyncio.run(post(f"http://r3:not-a-key@{host}/slime"))[0] == 401
    assert asyncio.run(post(f"http://{host}/slime"))[0] == 401
    shown = [httpx.get(f"{keyed.url}{path}", headers={"Authorization": f"Bearer {KEYS[1]}"}).text
             for path in ("/metrics", "/v1/info")]
    log = keyed.log.read_text()
    assert "POST /slime" in log
    for text in (*shown, log):
        assert KEYS[0] not in text and basic("r3", KEYS[0]) not in text


@pytest.mark.slow
def test_request_texts_never_reach_the_log(tmp_path: Path) -> None:
    """At the default (info) level, no route logs a request's text: scored, invalid, over a limit."""
    proc = start_service(tmp_path, R3_MAX_ITEMS="2", R3_LOG_LEVEL="info")
    marker = f"secret-{uuid.uuid4().hex}"
    try:
        bodies = [("/reward", {"items": [{"query": f"{marker} q", "response": f"{marker} r",
                                          "reference": f"{marker} ref", "query_type": "closed"}]}),
                  ("/reward", {"items": [{"query": marker, "response": 5}]}),  # 422
                  ("/reward", {"items": [{"query": marker, "response": marker}] * 3}),  # 413
                  ("/reward", {"items": [{"query": marker, "response": marker}], "backend": marker}),
                  ("/get_reward", {"query": [f"USER: {marker} ASSISTANT: {marker}"], "labels": [marker]}),
                  ("/get_reward", {"query": [marker], "prompts": [f"not a prefix {marker}"]})]
        for path, body in bodies:
            httpx.post(f"{proc.url}{path}", json=body, timeout=60)
        httpx.post(f"{proc.url}/reward", content=f'{{"items": [{{"query": "{marker}'.encode(), timeout=60,
                   headers={"content-type": "application/json"})
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert "POST /reward" in log  # the log was written (uvicorn's access line: path, not body)
    assert marker not in log


def listening_on(table: str, port_suffix: str) -> list[str]:
    """Local addresses of the listening sockets on a port, from the kernel's table."""
    rows = (line.split() for line in Path(table).read_text().splitlines()[1:])
    return [row[1] for row in rows if row[3] == "0A" and row[1].endswith(port_suffix)]


@pytest.mark.slow
def test_binds_to_loopback_by_default() -> None:
    """`r3-serve` without --host listens on 127.0.0.1 only."""
    port = free_port()
    process = start_server({}, port)
    try:
        suffix = f":{port:04X}"
        assert listening_on("/proc/net/tcp", suffix) == [f"0100007F{suffix}"]  # 127.0.0.1, little-endian
        assert listening_on("/proc/net/tcp6", suffix) == []
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("path", ["/reward", "/get_reward"])
def test_undecodable_bodies_get_a_documented_status_without_internals(app_client: TestClient,
                                                                      path: str) -> None:
    """Bytes that are not UTF-8 JSON (found by schemathesis): the answer's status is one the
    schema documents for the route, and its body a plain JSON detail (no traceback)."""
    schema = app_client.get("/openapi.json").json()
    documented = schema["paths"][path]["post"]["responses"]
    for content in (b"\xff\xfe\x00{", b"i\xa0\xf1b", b"\x00", json.dumps({"items": "x"}).encode()[:-1]):
        got = app_client.post(path, content=content, headers={"content-type": "application/json"})
        assert str(got.status_code) in documented, (content, got.status_code, sorted(documented))
        assert "detail" in got.json() and "Traceback" not in got.text and ".py" not in got.text
