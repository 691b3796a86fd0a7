#!/usr/bin/env bash
# The test suite, as README.md's "Tests" section gives it, with the project's environment
# (set up first if needed, see scripts/setup.sh). Arguments replace the default test paths:
#
#   bash scripts/test.sh                           # the whole suite (or: make test)
#   bash scripts/test.sh -x tests/test_config.py   # a part of it (or: make test TESTS="...")
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV="$VENV" bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
    set -- tests plugins/kdflow-plugin-example/tests
fi
exec "$VENV/bin/python" -m pytest -q "$@"
