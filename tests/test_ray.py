"""r3 on Ray Serve, on a real two-node Ray cluster on this machine (head and worker, one CPU
each), deployed from the shipped Serve config with `serve run`, as a user would.

Ray's own control traffic uses this machine's address; the Serve proxy listens on 127.0.0.1 and
every request here goes there. Token authentication is off for this loopback test cluster
(`RAY_AUTH_MODE=disabled`); the cluster is stopped by the pids this module started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT, RedisServer, free_port, in_process, wait_until
from r3_client import RewardClient

pytestmark = pytest.mark.slow

SERVE_CONFIG = ROOT / "configs" / "serve.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
ITEMS = [
    {"query": "What is the capital of France?", "response": "Paris is the capital of France.",
     "reference": "The capital of France is Paris.", "query_type": "closed"},
    {"query": "Write a short poem about the sea.", "response": "Waves fold in silver light, again."},
    {"query": "Name a primary colour.", "response": "Red.", "query_type": "open"},
]


KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPLICA_BOUND = 32_768  # tokens per replica: a few 64-item requests, far above the other tests' load


@dataclass
class RayCluster:
    address: str
    url: str
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def info(self) -> dict:
        answer = httpx.get(f"{self.url}/v1/info", headers=AUTH, timeout=60)
        answer.raise_for_status()
        return answer.json()["deployment"]


def ray_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("R3_", "RAY_"))}
    return {**env, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            **extra}


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def serve_config(port: int, **deployment: object) -> dict:
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["deployments"][0].update(deployment)
    return config


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[RayCluster]:
    """Head + worker node, then `serve run` of the shipped config (2 replicas, one per node)."""
    tmp = tmp_path_factory.mktemp("ray")
    env = ray_env(tmp, R3_REDIS_URL=redis_server.url, R3_MAX_QUEUE_TOKENS=str(REPLICA_BOUND), R3_API_KEYS=KEY,
                  R3_DTYPE="float32")
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    node = ["--num-cpus", "1", "--block"]
    result = RayCluster(address, f"http://127.0.0.1:{http_port}", env)
    try:
        result.processes.append(start([*ray, "start", "--head", "--port", str(port),
                                       "--temp-dir", str(tmp / "ray"), "--include-dashboard", "false", *node],
                                      env, tmp / "head.log"))
        wait_until(lambda: subprocess.run([*ray, "status", "--address", address], env=env,
                                          capture_output=True).returncode == 0, 120, "the Ray head")
        result.processes.append(start([*ray, "start", "--address", address, *node], env, tmp / "worker.log"))
        wait_until(lambda: "2 node" in nodes_line(ray, address, env), 120, "the Ray worker")
        config = tmp / "serve.yaml"
        config.write_text(yaml.safe_dump(serve_config(http_port)))
        result.processes.append(start([sys.executable, "-m", "ray.serve.scripts", "run", str(config),
                                       "--address", address], env, tmp / "serve.log"))
        wait_until(lambda: httpx.get(f"{result.url}/readyz", timeout=5).status_code == 200
                   and result.info()["replicas"] == 2, 300, "r3 on Ray Serve")
        yield result
    finally:
        for process in reversed(result.processes):  # serve run, worker, head
            stop(process)


def nodes_line(ray: list[str], address: str, env: dict[str, str]) -> str:
    status = subprocess.run([*ray, "status", "--address", address], env=env, capture_output=True, text=True)
    active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return f"{active.count('node_')} node"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray's raylet, GCS, workers and actors), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process and everything it started, SIGKILL to what is left after 20 s."""
    tree = [process.pid, *descendants(process.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(20)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(10)


def replica_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ServeReplica:r3:R3Replica"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_rewards_through_ray_equal_r3_serves(cluster: RayCluster) -> None:
    body = {"items": ITEMS, "return_components": True}
    served = httpx.post(f"{cluster.url}/reward", json=body, headers=AUTH, timeout=60)
    with in_process() as local:
        expected = local.post("/reward", json=body).json()
    assert served.status_code == 200
    assert served.json()["rewards"] == pytest.approx(expected["rewards"], rel=1e-5)
    assert [c["relevance_target"] for c in served.json()["components"]] == ["reference", "query", "query"]


def test_keys_limits_and_errors_behave_as_under_r3_serve(cluster: RayCluster) -> None:
    url = f"{cluster.url}/reward"
    assert httpx.get(f"{cluster.url}/healthz", timeout=30).status_code == 200  # probes need no key
    assert httpx.post(url, json={"items": ITEMS}, timeout=30).status_code == 401
    misspelt = httpx.post(url, json={"items": [{"query": "q", "response": "r", "refrence": "x"}]},
                          headers=AUTH, timeout=30)
    assert misspelt.status_code == 422 and misspelt.json()["detail"][0]["loc"][-1] == "refrence"
    too_many = httpx.post(url, json={"items": [{"query": "q", "response": "r"}] * 4097}, headers=AUTH,
                          timeout=60)
    assert too_many.status_code == 413 and "R3_MAX_ITEMS" in too_many.json()["detail"]
    not_json = httpx.post(url, content=b"{", headers={**AUTH, "content-type": "application/json"}, timeout=30)
    assert not_json.status_code == 400


def test_two_replicas_on_two_nodes_share_concurrent_load_and_metrics(cluster: RayCluster) -> None:
    deployment = cluster.info()
    assert deployment["kind"] == "ray-serve" and deployment["replicas"] == 2
    assert len(deployment["nodes"]) == 2  # one replica per node (each node has one CPU)
    with RewardClient(cluster.url, timeout=120, api_key=KEY) as client:
        def send(index: int) -> list[float]:
            return client.score([(f"Question {index}: name a planet.", f"Planet number {index} is Mars.")])

        results: list[list[float]] = []
        threads = [threading.Thread(target=lambda i=i: results.append(send(i))) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 32 and all(len(r) == 1 for r in results)
    metrics = httpx.get(f"{cluster.url}/metrics", headers=AUTH, timeout=60).text
    served = {line.split('replica="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("r3_items_total{")}
    assert len(served) == 2, metrics  # both replicas' series, each labelled
    assert sum(served.values()) >= 32 and all(count > 0 for count in served.values())


def test_a_burst_through_the_ray_ingress_is_admitted_per_replica(cluster: RayCluster) -> None:
    """48 concurrent 64-item requests through Serve's proxy: each replica admits what fits its own
    bound and refuses the rest at once (429 with Retry-After, before any admitted request is
    answered); both replicas refuse some, and no request fails otherwise."""
    import asyncio
    import json

    from conftest import DATA
    from r3_tools.loadgen import make_pairs, post_plain

    def rejections() -> dict[str, float]:
        text = httpx.get(f"{cluster.url}/metrics", headers=AUTH, timeout=60).text
        return {line.split('replica="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("r3_queue_rejections_total{")}

    before = rejections()
    pairs = make_pairs(DATA, 48 * 64, grouped=False)
    items = [{**p.item(), "query": f"{p.query} [ray burst]"} for p in pairs]
    bodies = [json.dumps({"items": items[i:i + 64]}).encode() for i in range(0, len(items), 64)]
    started = time.perf_counter()

    async def timed(body: bytes) -> tuple[int, float, dict[str, str]]:
        status, headers = await post_plain(cluster.url, "/reward", body, headers=AUTH, timeout=180)
        return status, time.perf_counter() - started, headers

    async def burst() -> list[tuple[int, float, dict[str, str]]]:
        return await asyncio.gather(*(timed(body) for body in bodies))

    answers = asyncio.run(burst())
    assert {status for status, _, _ in answers} == {200, 429}, sorted(s for s, _, _ in answers)
    refused = [seconds for status, seconds, _ in answers if status == 429]
    assert all(int(headers["retry-after"]) >= 1 for status, _, headers in answers if status == 429)
    done = [seconds for status, seconds, _ in answers if status == 200]
    assert len(refused) + len(done) == len(bodies)
    assert max(refused) < min(done), (max(refused), min(done))
    after = rejections()
    per_replica = {replica: after[replica] - before.get(replica, 0.0) for replica in after}
    assert len(per_replica) == 2 and all(count > 0 for count in per_replica.values()), per_replica
    assert sum(per_replica.values()) == len(refused)


@dataclass
class Load:
    """Clients scoring in a loop (with the client's retries) until stopped."""

    url: str
    threads: int = 4
    answered: int = 0
    failures: list[BaseException] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self.workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for worker in self.workers:
            worker.start()
        time.sleep(3)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(2)
        self.done.set()
        for worker in self.workers:
            worker.join(120)

    def _run(self) -> None:
        with RewardClient(self.url, timeout=120, max_retries=8, api_key=KEY) as client:
            while not self.done.is_set():
                try:
                    client.score([("Describe the sea.", "The sea is wide and grey and full of light.")])
                    self.answered += 1
                except Exception as error:
                    self.failures.append(error)


def test_a_replica_killed_under_load_is_restarted_and_no_request_is_lost(cluster: RayCluster) -> None:
    before = set(replica_pids())
    assert len(before) == 2
    with Load(cluster.url) as load:
        killed_at = time.monotonic()
        os.kill(sorted(before)[0], signal.SIGKILL)
        wait_until(lambda: len(set(replica_pids()) - before) == 1 and cluster.info()["replicas"] == 2,
                   180, "a replacement replica")
        recovered_s = time.monotonic() - killed_at
    assert not load.failures, load.failures[:3]
    assert load.answered > 0
    print(f"replica replaced and serving {recovered_s:.1f} s after SIGKILL; {load.answered} requests, 0 lost")


def test_a_node_removed_under_load_has_its_replica_rescheduled(cluster: RayCluster,
                                                               tmp_path: Path) -> None:
    """A third node joins; the worker node (one replica) goes away: its replica moves there."""
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    cluster.processes.append(start([*ray, "start", "--address", cluster.address, "--num-cpus", "1",
                                    "--block"], cluster.env, tmp_path / "third.log"))
    wait_until(lambda: "3 node" in nodes_line(ray, cluster.address, cluster.env), 120, "the third node")
    before = set(cluster.info()["nodes"])
    with Load(cluster.url) as load:
        removed_at = time.monotonic()
        stop(cluster.processes[1])  # the worker node, and the replica on it

        def moved() -> bool:
            deployment = cluster.info()
            return deployment["replicas"] == 2 and len(set(deployment["nodes"]) - before) == 1

        wait_until(moved, 240, "the replica rescheduled on the third node")
        recovered_s = time.monotonic() - removed_at
    assert not load.failures, load.failures[:3]
    print(f"replica rescheduled {recovered_s:.1f} s after its node left; {load.answered} requests, 0 lost")


HANDLE_DRIVER = """
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
from r3_service.ray_serve import make_handle_reward_func
reward = make_handle_reward_func()
items = json.loads(sys.argv[2])
print(json.dumps({"name": reward.__name__, "rewards": reward(
    [i["query"] for i in items], [i["response"] for i in items],
    reference=[i.get("reference") for i in items], query_type=[i.get("query_type") for i in items])}))
"""


def test_a_trainer_inside_the_cluster_scores_through_the_handle(cluster: RayCluster) -> None:
    """The handle adapter (no HTTP) gives the HTTP path's rewards, with TRL's call shape."""
    import json

    driver = subprocess.run([sys.executable, "-c", HANDLE_DRIVER, cluster.address, json.dumps(ITEMS)],
                            env=cluster.env, capture_output=True, text=True, timeout=180)
    assert driver.returncode == 0, driver.stderr[-2000:]
    answer = json.loads(driver.stdout.strip().splitlines()[-1])
    served = httpx.post(f"{cluster.url}/reward", json={"items": ITEMS}, headers=AUTH,
                        timeout=60).json()["rewards"]
    assert answer["name"] == "r3" and answer["rewards"] == pytest.approx(served, rel=1e-6)


def test_kuberay_manifest_serves_the_shipped_config() -> None:
    """The RayService's serveConfigV2 is configs/serve.yaml's applications, exactly."""
    service = yaml.safe_load(RAYSERVICE.read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load(SERVE_CONFIG.read_text())
    assert embedded == {"applications": shipped["applications"]}
    assert shipped["applications"][0]["import_path"] == "r3_service.ray_serve:build"
