#!/usr/bin/env bash
# Install everything the tests need (Python packages, redis-server), then run the whole suite.
# Tests start their own redis-server and r3-serve processes on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server with apt-get" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[all]"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

python3 -m ruff check service client trainer tests
python3 -m pytest "$@"
