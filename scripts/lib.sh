# Shared by scripts/soak.sh and scripts/fuzz-long.sh: a redis-server and an r3-serve on 127.0.0.1,
# stopped (by their own pids) when the calling script exits. Source it; do not run it.

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
STARTED_PIDS=()

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() {  # URL SECONDS: until URL answers 200
    python3 - "$1" "$2" <<'PY'
import sys, time, httpx
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        if httpx.get(url, timeout=1).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
sys.exit(f"{url} did not answer within {sys.argv[2]} s")
PY
}

redis_command() {  # PORT DIR: the command line of a redis-server that saves only when told to
    echo "redis-server --port $1 --bind 127.0.0.1 --save '' --appendonly no --dir $2"
}

start_redis() {  # PORT DIR: an empty, non-persistent redis-server; sets REDIS_URL
    command -v redis-server >/dev/null || { echo "redis-server is not installed (scripts/test.sh installs it)" >&2; exit 1; }
    eval "$(redis_command "$1" "$2") >/dev/null &"
    STARTED_PIDS+=($!)
    REDIS_URL="redis://127.0.0.1:$1/0"
    python3 -c "import redis, time
for _ in range(100):
    try: redis.Redis.from_url('$REDIS_URL').ping(); break
    except redis.ConnectionError: time.sleep(0.1)"
}

start_service() {  # PORT LOG: r3-serve with the caller's R3_* environment; sets SERVICE_PID, SERVICE_URL
    python3 -m r3_service.cli --host 127.0.0.1 --port "$1" >"$2" 2>&1 &
    SERVICE_PID=$!
    STARTED_PIDS+=("$SERVICE_PID")
    SERVICE_URL="http://127.0.0.1:$1"
    wait_http "$SERVICE_URL/readyz" 300
}

stop_started() {
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
