#!/usr/bin/env bash
# The embedding servers r3-bench compares r3-serve with, each in its own virtual environment under
# .venv-peers/ (git-ignored): they pin other versions of transformers than r3 does.
#   bash scripts/peer-venv.sh infinity     # infinity-emb 0.0.78 (torch engine; needs transformers < 5)
# Prints the environment's python. torch is the same CPU build as r3's (installed first, pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
peer="${1:?usage: peer-venv.sh infinity}"
venv=".venv-peers/$peer"
case "$peer" in
    infinity) packages=("infinity-emb[server,torch]==0.0.78" "transformers<5" "sentence-transformers<5") ;;
    *) echo "unknown peer: $peer" >&2; exit 2 ;;
esac
if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q torch==2.13.0
    "$venv/bin/python" -m pip install -q "torch==2.13.0" "${packages[@]}"
    touch "$venv/.complete"
fi
echo "$PWD/$venv/bin/python"
