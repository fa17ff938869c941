#!/usr/bin/env bash
# The soak run: redis-server (AlpacaFarm loaded) + r3-serve with default settings, capacity measured
# in a closed loop, then SOAK_SECONDS (default 7200: two hours) open-loop at 80% of it with a
# trainer's mix of requests, the service's memory sampled from /metrics every 10 s, and faults
# injected on the way (FAULTS, default a Redis restart at 40%, 200 clients leaving mid-request at
# 55%, a burst at twice the queue bound at 70%). The soak's traffic and the faults' are two tenants
# (two API keys), as two training jobs sharing the service. Writes bench/results/soak.{json,png,md} (OUT=prefix
# to change it); exits 1 unless the verdict is a pass (tools/r3_tools/soak.py). Run it on a quiet
# machine: it measures.
#   bash scripts/soak.sh                                              # two hours
#   SOAK_SECONDS=120 FAULTS= OUT=/tmp/soak bash scripts/soak.sh --users 4   # extra args go to r3_tools.soak
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SOAK_SECONDS=${SOAK_SECONDS:-7200}
OUT=${OUT:-bench/results/soak}
FAULTS=${FAULTS-redis@0.18,disconnects@0.2,burst@0.22,redis@0.45,disconnects@0.55,burst@0.65}
work=$(mktemp -d)
redis_port=$(free_port)
trap 'stop_started; pkill -f "redis-server 127.0.0.1:$redis_port" 2>/dev/null || true; cp "$work/serve.log" "$OUT.serve.log" 2>/dev/null || true; rm -rf "$work"' EXIT

start_redis "$redis_port" "$work"
r3-qtypes load data/alpacafarm_val.json --redis-url "$REDIS_URL"
soak_key=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
fault_key=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export R3_TENANTS="[{\"name\": \"soak\", \"key\": \"$soak_key\"}, {\"name\": \"faults\", \"key\": \"$fault_key\"}]"
R3_REDIS_URL=$REDIS_URL start_service "$(free_port)" "$work/serve.log"
python3 -m r3_tools.soak --url "$SERVICE_URL" --duration "$SOAK_SECONDS" --out "$OUT" \
    --api-key "$soak_key" --fault-key "$fault_key" --faults "$FAULTS" \
    --redis-url "$REDIS_URL" --redis-start "$(redis_command "$redis_port" "$work")" "$@"
