#!/usr/bin/env bash
# The documentation site (mkdocs.yml, docs/), with MkDocs from the `docs` extra:
#   bash scripts/docs.sh                  # serve it on http://127.0.0.1:8000, rebuilt on every edit
#   PORT=8001 bash scripts/docs.sh        # another port (an r3-serve may hold 8000)
#   bash scripts/docs.sh build            # build it strictly into site/ (a broken link fails)
#   bash scripts/docs.sh build -d /tmp/s  # extra arguments go to mkdocs
#   bash scripts/docs.sh screenshots      # docs/assets/screenshots/ anew, with headless Chromium
# The pages under docs/reference/ are generated: `python -m r3_tools.docs` (`--check` to compare).
# Python: the active virtual environment, else $R3_VENV, else .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
    python="$VIRTUAL_ENV/bin/python"
elif [ -x "${R3_VENV:-.venv}/bin/python" ]; then
    python="${R3_VENV:-.venv}/bin/python"
else
    python=python3
fi
if ! "$python" -c 'import mkdocs, material' 2>/dev/null; then
    echo "MkDocs is not installed in $python: pip install -c constraints.txt -e '.[docs]'" >&2
    exit 1
fi

screenshots() {  # build into a scratch folder, then one 1280x900 shot per page
    local chromium
    chromium=$(command -v chromium || command -v chromium-browser || true)
    [ -n "$chromium" ] || { echo "no chromium: apt-get install chromium" >&2; exit 1; }
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    "$python" -m mkdocs build --strict --quiet -d "$site"
    for pair in home:index integrations-trl:integrations/trl; do
        "$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900 \
            --screenshot="docs/assets/screenshots/${pair%%:*}.png" "file://$site/${pair#*:}.html" 2>/dev/null
    done
    ls -l docs/assets/screenshots/
}

export NO_MKDOCS_2_WARNING=1  # Material's notice about its successor, on every run
case "${1:-serve}" in
    screenshots) screenshots ;;
    build) shift || true; exec "$python" -m mkdocs build --strict --clean "$@" ;;
    serve) shift || true; exec "$python" -m mkdocs serve --strict --dev-addr "127.0.0.1:${PORT:-8000}" "$@" ;;
    *) echo "usage: bash scripts/docs.sh [serve|build|screenshots] [mkdocs arguments]" >&2; exit 2 ;;
esac
