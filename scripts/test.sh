#!/usr/bin/env bash
# The test suite, as README.md's "Tests" section gives it, with the project's environment
# (set up first if needed, see scripts/setup.sh). Arguments replace the default test paths:
#
#   bash scripts/test.sh                           # the whole suite (or: make test)
#   bash scripts/test.sh -x tests/unit/test_config.py   # a part of it (or: make test TESTS="...")
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV="$VENV" bash scripts/setup.sh
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ "$#" -eq 0 ]; then
    # README.md's "Tests" command, verbatim (tests/integration/test_cli.py checks that CI runs exactly it)
    python -m pytest -q tests plugins/kdflow-plugin-example/tests
else
    python -m pytest -q "$@"
fi
