"""Parts for the tests: the app in this process (an ASGI test client, no port), and the real
parts the integration tests need: redis-server processes and r3-serve (uvicorn) processes on
127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from r3_tools.loadgen import free_port  # re-exported for the tests

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from r3_service.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "alpacafarm_val.json"


# Fixtures that start a real redis-server or r3-serve: a test using one (directly or through
# another fixture) is `slow`. Tests that start processes themselves carry the mark by hand.
SERVER_FIXTURES = {"redis_server", "service", "tight", "keyed", "flaky_service", "fresh_service", "two_jobs"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`pytest -m "not slow"` is the fast tier: everything that needs no real server."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: run scripts/test.sh, which installs it"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        wait_until(answers, 15, "redis-server")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@dataclass
class ServiceProcess:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_service(tmp_dir: Path, **env: str) -> ServiceProcess:
    """Run `r3-serve` as a user would, with R3_* settings from `env`."""
    port = free_port()
    log = tmp_dir / f"r3-serve-{port}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("R3_")}
    environment.update({"R3_DTYPE": "float32", **env})  # parity with the rule is checked exactly
    process = subprocess.Popen(
        [sys.executable, "-m", "r3_service.cli", "--host", "127.0.0.1", "--port", str(port)],
        env=environment, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"r3-serve exited with {process.returncode}:\n{log.read_text()}")
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200

    try:
        wait_until(ready, 120, "r3-serve")
    except BaseException:
        process.kill()
        raise
    return ServiceProcess(url, process, log)


@pytest.fixture(scope="session")
def service(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The service as deployed: default model and scoring, Redis as its store."""
    proc = start_service(tmp_path_factory.mktemp("service"), R3_REDIS_URL=redis_server.url)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def server_url(service: ServiceProcess) -> str:
    return service.url


def app_settings(**settings: object) -> Settings:
    """`Settings(**settings)` without this environment's R3_* variables."""
    from r3_service.settings import Settings

    with pytest.MonkeyPatch.context() as env:
        for name in [name for name in os.environ if name.startswith("R3_")]:
            env.delenv(name)
        return Settings(**settings)


@contextmanager
def in_process(**settings: object) -> Iterator[TestClient]:
    """The app of `create_app(app_settings(**settings))` in this process, lifespan and all
    (models loaded, engine started), behind an ASGI test client: no port, no uvicorn. The queue
    bound is fixed unless given (measuring it takes seconds at start-up; no test here is about it),
    and the dtype is the exact float32 unless given: parity with the rule is checked exactly."""
    from fastapi.testclient import TestClient

    from r3_service.api.app import create_app

    settings = {"max_queue_tokens": 4096 * 64, "dtype": "float32", **settings}
    with TestClient(create_app(app_settings(**settings))) as client:
        yield client


@pytest.fixture(scope="session")
def app_client() -> Iterator[TestClient]:
    """The default app in this process: every preset, the packaged MiniLM, the learned classifier,
    the in-process store."""
    with in_process() as client:
        yield client


@pytest.fixture(scope="session")
def dataset() -> list[dict]:
    return json.loads(DATA.read_text())


@pytest.fixture(scope="session")
def embedding_model():
    from r3_service.models.embedding import EmbeddingModel
    from r3_service.settings import DEFAULT_MODEL

    return EmbeddingModel(DEFAULT_MODEL, device="cpu")


def save_tiny_bert(path: Path, model_class: str = "BertModel", **config: object) -> Path:
    """A randomly initialised 2-layer BERT with the packaged MiniLM's tokenizer, saved like a hub
    checkpoint (config, weights, tokenizer only): real loading code, no hub."""
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig

    from r3_service.models.base import resolve_model_path
    from r3_service.settings import DEFAULT_MODEL

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=512, **config)
    getattr(transformers, model_class)(bert).save_pretrained(path)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(path)
    return path
