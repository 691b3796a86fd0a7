#!/usr/bin/env bash
# The quickstart: set up the project's environment if needed (scripts/setup.sh), then distill
# SmolLM2-135M-Instruct into a 4-layer student (recipes/quickstart.yaml) into
# outputs/quickstart/, and end with `kdcore eval` on the run: held-out teacher-KL, perplexity,
# ROUGE-L of greedy answers, and teacher / student answers side by side. Arguments are recipe
# overrides or train options:
#
#   bash scripts/quickstart.sh                     # or: make quickstart
#   bash scripts/quickstart.sh train.max_steps=10  # or: make quickstart ARGS="train.max_steps=10"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV="$VENV" bash scripts/setup.sh
"$VENV/bin/kdcore" train quickstart "$@"
out=outputs/quickstart
for arg in "$@"; do
    case "$arg" in train.output_dir=*) out=${arg#train.output_dir=} ;; esac
done
exec "$VENV/bin/kdcore" eval "$out" --samples 3
