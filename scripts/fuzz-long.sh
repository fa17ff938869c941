#!/usr/bin/env bash
# The long fuzz: schemathesis against a live r3-serve (Redis store) from its own OpenAPI schema,
# every phase, >= 1,000 cases, deterministic seed. Checks: no 5xx, documented status codes and
# content types, responses matching their schemas. Writes a summary to bench/results/fuzz-long.txt
# (OUT=path to change it); the 5xx count comes from the service's own /metrics.
#   bash scripts/fuzz-long.sh            # MAX_EXAMPLES=600 per operation (default), SEED=42
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

MAX_EXAMPLES=${MAX_EXAMPLES:-600}
SEED=${SEED:-42}
OUT=${OUT:-bench/results/fuzz-long.txt}
work=$(mktemp -d)
trap 'stop_started; rm -rf "$work"' EXIT

start_redis "$(free_port)" "$work"
R3_REDIS_URL=$REDIS_URL start_service "$(free_port)" "$work/serve.log"

started=$(date +%s)
set +e
(cd "$work" && st run "$SERVICE_URL/openapi.json" --max-examples "$MAX_EXAMPLES" --seed "$SEED" --workers 1 \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --continue-on-failure --request-timeout 120 --no-color --report json --report-dir "$work/report" \
    >"$work/st.txt" 2>&1)  # in $work: schemathesis keeps a crash cache in the working directory
st_exit=$?
set -e

python3 - "$work" "$SERVICE_URL" "$st_exit" "$(( $(date +%s) - started ))" "$OUT" <<'PY'
import glob, json, platform, os, sys, time
from collections import Counter
from r3_tools.loadgen import scrape

work, url, st_exit, seconds, out = sys.argv[1:]
report = json.load(open(glob.glob(f"{work}/report/*.json")[0]))
statuses = Counter()
for sample, value in scrape(url).items():
    if sample.startswith("r3_requests_total{"):
        labels = dict(part.split("=") for part in sample[len("r3_requests_total{"):-1].split(","))
        statuses[labels["status"].strip('"')] += int(value)
server_errors = sum(count for status, count in statuses.items() if status.startswith("5"))
cases = report["test_cases"]["generated"]
lines = [
    f"r3 long fuzz, {time.strftime('%Y-%m-%d')}: schemathesis {report['schemathesis_version']}, "
    f"{platform.machine()} {os.cpu_count()} CPUs, seed {report['seed']}, {seconds} s",
    f"command: {report['command'].replace(url, 'http://127.0.0.1:PORT').replace(work, '$TMP')}",
    f"test cases: {cases} generated over {report['operations']['tested']} operations "
    f"(phases: {', '.join(k + ' ' + v['status'] for k, v in report['phases'].items())})",
    f"5xx answers (service /metrics): {server_errors}",
    "answers by status (service /metrics, incl. schema fetch): "
    + ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())),
    f"failures ({report['test_cases']['unique_failures']} unique):",
    *[f"  {f['code']} {f['title']}: {f['count']} ({', '.join(f['operations'])})" for f in report["failures"]],
    *([] if report["failures"] else ["  none"]),
    f"errors: {len(report['errors'])}; schemathesis exit code {st_exit}",
    f"verdict: {'PASS' if server_errors == 0 and cases >= 1000 else 'FAIL'} (target: 0 5xx in >= 1,000 cases)",
]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if server_errors == 0 and cases >= 1000 else 1)
PY
