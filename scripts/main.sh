#!/usr/bin/env bash
# The README's main job: install, then convert the packaged SmolLM2-135M (3 KV heads) to MQA (`fit`, the best GQA
# method) and to MLA at -68.75 % KV (stock deepseek_v3 format, every MLA default), and evaluate them beside the
# original. `--method mean` adds the GQA paper's mean-pooling baseline; `--mla-kv-budget none` skips MLA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m hf_attn_swap demo "$@"
