#!/usr/bin/env bash
# The quickstart: set up the project's environment if needed (scripts/setup.sh), then distill
# SmolLM2-135M-Instruct into a 4-layer student (recipes/quickstart.yaml) into
# outputs/quickstart/, and end with `kdcore eval` on the run: held-out teacher-KL, perplexity
# and top-1 before and after training, ROUGE-L of greedy answers, and teacher / student answers
# side by side. Arguments are recipe overrides or train options:
#
#   bash scripts/quickstart.sh                     # or: make quickstart
#   bash scripts/quickstart.sh train.max_steps=10  # or: make quickstart ARGS="train.max_steps=10"
#   bash scripts/quickstart.sh --overwrite         # start over in outputs/quickstart (the old run is
#                                                  # moved to outputs/quickstart.old-<time>, never deleted)
#   bash scripts/quickstart.sh --resume            # continue the run in outputs/quickstart
#
# Run again without those flags, it keeps the earlier run and numbers the new one
# (outputs/quickstart-2, -3, ...), saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV="$VENV" bash scripts/setup.sh
out=outputs/quickstart
chosen=0
for arg in "$@"; do
    case "$arg" in
        train.output_dir=*) out=${arg#train.output_dir=}; chosen=1 ;;
        --overwrite|--resume) chosen=1 ;;
    esac
done
# what makes a folder hold a run (kdcore/storage/run_folder.py RUN_MARKERS): kdcore train refuses it
holds_run() { [ -e "$1/metrics.jsonl" ] || [ -e "$1/checkpoints" ] || [ -e "$1/hf" ] || [ -e "$1/recipe.yaml" ]; }
if [ "$chosen" = 0 ] && holds_run "$out"; then
    n=2
    while holds_run "$out-$n"; do n=$((n + 1)); done
    echo "quickstart: $out holds an earlier run (kept); this run goes to $out-$n." \
         "To start over in $out instead: bash scripts/quickstart.sh --overwrite; to continue it: --resume"
    out="$out-$n"
    set -- "$@" "train.output_dir=$out"
fi
"$VENV/bin/kdcore" train quickstart "$@"
exec "$VENV/bin/kdcore" eval "$out" --samples 3
