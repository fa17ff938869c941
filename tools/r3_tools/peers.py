"""The embedding server a user would deploy instead of r3-serve, on r3-bench's HTTP workloads.

The peer serves the same model from its own virtual environment (`scripts/peer-venv.sh`: it pins
other versions of transformers); R3 is computed in the client from its embeddings with the rule's
own code (`rule.reward.score`), which is what a user of a plain embedding server has to do. Each
request embeds the texts of `items` pairs, a GRPO group's shared prompt once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from r3_service.engine.backends import rule_params
from r3_service.rule.features import clean_response
from r3_service.rule.reward import PRESETS, ResolvedItem, score
from r3_service.settings import R3BackendSpec, Settings
from r3_tools.loadgen import Pair

ROOT = Path(__file__).resolve().parents[2]
INFINITY_VERSION = "0.0.78"


def peer_python(peer: str) -> str:
    """The peer's environment (created on first use)."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "peer-venv.sh"), peer], check=True,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def start_infinity(model_path: str, port: int, log: Path, dtype: str = "float32") -> subprocess.Popen:
    """infinity-emb's torch engine on 127.0.0.1:`port`, serving `model_path` as "r3-peer" in `dtype`
    (its weights' dtype: float32, float16, bfloat16)."""
    binary = Path(peer_python("infinity")).parent / "infinity_emb"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    command = [str(binary), "v2", "--model-id", model_path, "--served-model-name", "r3-peer",
               "--engine", "torch", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--no-bettertransformer"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"infinity_emb exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"infinity_emb did not become ready in 300 s; see {log}")


class ClientSideR3:
    """R3 from a plain embedding server's vectors, with the service's rule and parameters."""

    def __init__(self, settings: Settings) -> None:
        self.preset = PRESETS["r3"]
        self.params = rule_params(R3BackendSpec(preset="r3"), settings, normalized=True)

    def rewards(self, pairs: list[Pair], vectors: dict[str, list[float]]) -> list[float]:
        out = []
        for pair in pairs:
            response = clean_response(pair.response)
            target, response_vector = vectors[pair.target], vectors[pair.response]
            s = sum(a * b for a, b in zip(target, response_vector, strict=True))
            item = ResolvedItem(pair.query, response, pair.reference, pair.query_type or "open",  # type: ignore[arg-type]
                                "request", "request" if pair.reference else None)
            out.append(score(self.preset, item, s, self.params).reward)
        return out


def chunks(pairs: list[Pair], items: int) -> Iterator[list[Pair]]:
    while True:
        for start in range(0, len(pairs) - items + 1, items):
            yield pairs[start:start + items]


def peer_load(url: str, pairs: list[Pair], items: int, concurrency: int, duration: float,
              rule: ClientSideR3) -> float:
    """Closed loop like r3-bench's: `concurrency` clients, each embedding the texts of its next
    `items` pairs (distinct texts once) and computing their R3; pairs scored per second."""

    async def main() -> float:
        source = chunks(pairs, items)
        done = 0
        deadline = time.perf_counter() + duration
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def user() -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    batch = next(source)
                    texts = list(dict.fromkeys([p.target for p in batch] + [p.response for p in batch]))
                    reply = await client.post("/embeddings", json={"model": "r3-peer", "input": texts})
                    reply.raise_for_status()
                    data = sorted(reply.json()["data"], key=lambda d: d["index"])
                    rule.rewards(batch, {t: d["embedding"] for t, d in zip(texts, data, strict=True)})
                    done += len(batch)

            started = time.perf_counter()
            await asyncio.gather(*(user() for _ in range(concurrency)))
            return done / (time.perf_counter() - started)

    return asyncio.run(main())
