#!/usr/bin/env bash
# Create (idempotently) a Python 3.13 venv holding mongoeco[wire], a local
# MongoDB wire-protocol stand-in used by the tests.
# Venv location: ${CREDIT_MONGO_VENV:-<repo>/.venv-mongo}
# The last line of stdout is the venv's python path.
# Exit 3: no usable python3.13 found.
set -euo pipefail

MONGOECO_SPEC='mongoeco[wire]==4.11.0'

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${CREDIT_MONGO_VENV:-$repo/.venv-mongo}"
vpy="$venv/bin/python"

# Already set up? (mongoeco importable with its wire extra and SQLite engine)
if [ -x "$vpy" ] && "$vpy" -c 'import mongoeco.wire.proxy, mongoeco.engines.sqlite, pymongo' >/dev/null 2>&1; then
    echo "$vpy"
    exit 0
fi

find_py313() {
    local cand
    # A pyenv shim may exist on PATH without working: actually run it.
    if cand="$(command -v python3.13 2>/dev/null)" && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1; then
        echo "$cand"; return 0
    fi
    for cand in /root/.pyenv/versions/3.13*/bin/python3.13 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3.13; do
        if [ -x "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

if ! py313="$(find_py313)"; then
    echo "mongo_venv.sh: no working python3.13 found (tried python3.13 on PATH and /root/.pyenv/versions/3.13*/bin/python3.13); mongoeco needs Python 3.13" >&2
    exit 3
fi

echo "mongo_venv.sh: creating $venv with $py313" >&2
if [ ! -x "$vpy" ]; then
    rm -rf "$venv"
    "$py313" -m venv "$venv" >&2
fi
"$vpy" -m pip install --disable-pip-version-check -q "$MONGOECO_SPEC" >&2
"$vpy" -c 'import mongoeco.wire.proxy, mongoeco.engines.sqlite, pymongo' >&2
echo "$vpy"
