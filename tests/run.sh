#!/usr/bin/env bash
# Installs what the tests need and runs them: the README's test command.
#   bash tests/run.sh [pytest args]
# Needs python3 (>= 3.11) and redis-server on PATH. The MongoDB suite uses a Python 3.13
# venv with mongoeco (tests/support/mongo_venv.sh); without Python 3.13 it is skipped. The
# PostgreSQL suite uses the server at 127.0.0.1:5432 (trust auth, user postgres; or
# CREDIT_TEST_POSTGRES_URL), in a database it makes and drops; without one it is skipped
# (CREDIT_TEST_STRICT=1 turns every skipped server suite into a failure, as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
bash tests/support/mongo_venv.sh >/dev/null || echo "tests/run.sh: MongoDB wire server unavailable; the mongo suite will skip" >&2
exec .venv/bin/python -m pytest "$@"
