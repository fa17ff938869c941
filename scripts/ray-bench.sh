#!/usr/bin/env bash
# r3-bench through the Ray Serve ingress on this machine, beside r3-serve measured directly:
# 1 replica with 2 CPUs (torch threads) vs r3-serve (Ray's proxy overhead), and 2 replicas with
# 1 CPU each vs 1 replica with 2. Writes bench/results/ray-*.{json,md,png}. Needs the [ray,bench]
# extras. A loopback-only cluster without token authentication (RAY_AUTH_MODE=disabled).
#   bash scripts/ray-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PORT=${PORT:-8777}
RAY_PORT=${RAY_PORT:-6399}
ARGS=(--concurrency 8,64 --items 1,64 --duration 8)
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export R3_EMBEDDING_CACHE_SIZE=0 R3_MAX_QUEUE_TOKENS=1000000000  # as r3-bench runs r3-serve

SHAPES=${SHAPES:-"1x2 2x1"}  # replicas x CPUs each
[ "${SKIP_BASELINE:-}" ] || r3-bench "${ARGS[@]}" --port "$PORT" --out "$OUT/ray-baseline-r3-serve"

for shape in $SHAPES; do
    set -- ${shape/x/ }
    # A fresh cluster per shape: a rolling update from 1x2 to 2x1 would wait for CPUs forever.
    ray start --head --port "$RAY_PORT" --num-cpus 2 --include-dashboard false --block > /tmp/r3-ray-head.log 2>&1 &
    HEAD=$!
    sleep 15
    python3 - "$1" "$2" "$PORT" > /tmp/r3-serve-bench.yaml <<'PY'
import sys, yaml
replicas, cpus, port = (int(v) for v in sys.argv[1:])
config = yaml.safe_load(open("configs/serve.yaml"))
config["http_options"]["port"] = port
deployment = config["applications"][0]["deployments"][0]
deployment["num_replicas"] = replicas
deployment["ray_actor_options"]["num_cpus"] = cpus
print(yaml.safe_dump(config))
PY
    serve run /tmp/r3-serve-bench.yaml --address "127.0.0.1:$RAY_PORT" > "/tmp/r3-serve-run-$1.log" 2>&1 &
    SERVE=$!
    python3 - "$PORT" "$1" <<'PY'
import sys, time, httpx
url, want = f"http://127.0.0.1:{sys.argv[1]}", int(sys.argv[2])
for _ in range(300):
    try:
        if httpx.get(f"{url}/v1/info", timeout=10).json()["deployment"]["replicas"] == want:
            break
    except (httpx.HTTPError, KeyError, ValueError):
        pass
    time.sleep(1)
PY
    r3-bench "${ARGS[@]}" --url "http://127.0.0.1:$PORT" --out "$OUT/ray-$1x$2cpu"
    kill -TERM "$SERVE"; wait "$SERVE" || true  # (a background job of a script ignores SIGINT)
    kill -TERM "$HEAD"; wait "$HEAD" || true
    sleep 5
done
