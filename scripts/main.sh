#!/usr/bin/env bash
# The README's main job: install, then convert the packaged SmolLM2-135M (3 KV heads) to MQA and evaluate both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m hf_attn_swap demo "$@"
