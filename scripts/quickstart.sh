#!/usr/bin/env bash
# The quickstart: set up the project's environment if needed (scripts/setup.sh), then distill
# SmolLM2-135M-Instruct into a 4-layer student (recipes/quickstart.yaml) into
# outputs/quickstart/. Arguments are recipe overrides or train options:
#
#   bash scripts/quickstart.sh                     # or: make quickstart
#   bash scripts/quickstart.sh train.max_steps=10  # or: make quickstart ARGS="train.max_steps=10"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV="$VENV" bash scripts/setup.sh
exec "$VENV/bin/kdcore" train quickstart "$@"
