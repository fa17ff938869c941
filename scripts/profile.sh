#!/usr/bin/env bash
# A sampling profile of r3-serve under load (issue 26): redis-server (AlpacaFarm loaded) and r3-serve
# with the caller's R3_* settings, driven by r3-loadtest (GRPO groups of 8 by default) while py-spy
# (the ray extra) samples every thread of the service. Writes OUT.svg (flame graph), OUT.txt (raw
# collapsed stacks) and OUT.md (share of samples per part: forward pass, tokenisation, rule, engine,
# API...; python -m r3_tools.stacks). Run it on a quiet machine.
#   bash scripts/profile.sh                                   # 30 s, 16 users x GRPO groups of 8
#   OUT=/tmp/p SECONDS_=10 bash scripts/profile.sh --users 64  # extra args go to r3-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

OUT=${OUT:-bench/results/profile/r3-serve}
DURATION=${SECONDS_:-30}
work=$(mktemp -d)
trap 'stop_started; rm -rf "$work"' EXIT
mkdir -p "$(dirname "$OUT")"
extra=("$@")
[ ${#extra[@]} -gt 0 ] || extra=(--users 16 --grpo 8)

start_redis "$(free_port)" "$work"
r3-qtypes load data/alpacafarm_val.json --redis-url "$REDIS_URL" >/dev/null
R3_REDIS_URL=$REDIS_URL start_service "$(free_port)" "$work/serve.log"
python3 -m r3_tools.loadtest --url "$SERVICE_URL" --duration 5 --drain 10 "${extra[@]}" >/dev/null  # warm-up
python3 -m r3_tools.loadtest --url "$SERVICE_URL" --duration "$((DURATION + 5))" --drain 10 "${extra[@]}" \
    --json "$OUT.load.json" > "$work/load.txt" &
load=$!
sleep 3
py-spy record --pid "$SERVICE_PID" --duration "$DURATION" --rate 100 --format raw -o "$OUT.txt" >/dev/null
py-spy record --pid "$SERVICE_PID" --duration 5 --rate 100 -o "$OUT.svg" >/dev/null
wait "$load"
{
    echo "# r3-serve under load: where the CPU goes"
    echo
    echo "Load: r3-loadtest ${extra[*]}; R3_* settings: $(env | grep '^R3_' | grep -v REDIS_URL | tr '\n' ' ')"
    echo "Machine: $(python3 -c 'from r3_tools.bench import machine; print(machine())')."
    echo
    tail -n 4 "$work/load.txt" | sed 's/^/    /'
    echo
    python3 -m r3_tools.stacks "$OUT.txt"
} > "$OUT.md"
cat "$OUT.md"
