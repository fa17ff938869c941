#!/usr/bin/env bash
# The soak run: redis-server (AlpacaFarm loaded) + r3-serve with default settings, capacity measured
# in a closed loop, then SOAK_SECONDS (default 600) open-loop at 80% of it with the service's RSS
# sampled every 5 s. Writes bench/results/soak.{json,png,md} (OUT=prefix to change it); exits 1
# unless 0 errors and < 5% RSS growth after warm-up. Run it on a quiet machine: it measures.
#   bash scripts/soak.sh                          # 10 minutes
#   SOAK_SECONDS=60 OUT=/tmp/soak bash scripts/soak.sh --users 4   # extra args go to r3_tools.soak
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SOAK_SECONDS=${SOAK_SECONDS:-600}
OUT=${OUT:-bench/results/soak}
work=$(mktemp -d)
trap 'stop_started; rm -rf "$work"' EXIT

start_redis "$(free_port)" "$work"
python3 -m r3_tools.store_admin load data/alpacafarm_val.json --redis-url "$REDIS_URL"
R3_REDIS_URL=$REDIS_URL start_service "$(free_port)" "$work/serve.log"
python3 -m r3_tools.soak --url "$SERVICE_URL" --pid "$SERVICE_PID" --duration "$SOAK_SECONDS" \
    --out "$OUT" "$@"
