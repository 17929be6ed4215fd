#!/usr/bin/env bash
# The Qwen2.5-Coder-0.5B-Instruct uptraining table (docs/guides/uptraining.md): its default MLA -50 % KV export
# (stock deepseek_v3), uptrained with the cheapest mode (layerwise: one teacher forward and the attention layers'
# backward per block; 16k tokens of the Python *library* docs), evaluated like the Qwen peers table: the held-out
# *tutorial* (first 4 096 tokens) and GPL-3 (4 096 tokens, unlike either). A step whose output exists is skipped.
#   bash scripts/uptrain_qwen.sh [WORKDIR]     then: python3 scripts/tables.py --add WORKDIR/uptrain.json
#                                                   results/uptrain_qwen.json
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/uptrain-qwen}
mkdir -p "$R"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
LIB=/usr/share/doc/python3.11/html/_sources/library   # training + calibration text; eval: the tutorial, GPL-3
SRC=$(python3 -m hf_attn_swap example-model qwen2.5-coder)
CLI="python3 -m hf_attn_swap"

[ -f "$R/mla-0.5/conversion.json" ] || $CLI convert "$SRC" "$R/mla-0.5" --to mla --kv-budget 128 --overwrite
[ -f "$R/mla-0.5-layerwise-16k/conversion.json" ] ||
  $CLI uptrain "$R/mla-0.5" "$R/mla-0.5-layerwise-16k" --mode layerwise --max-tokens 16384 --data $LIB \
    --block-size 512 --save-steps 8 --no-progress --overwrite --freeze kv_a_proj_with_mqa \
    --json "$R/mla-0.5-layerwise-16k.json"

models=(original="$SRC" mla-0.5="$R/mla-0.5" mla-0.5-layerwise-16k="$R/mla-0.5-layerwise-16k")
$CLI eval "${models[@]}" --reference "$SRC" --max-tokens 4096 --window 1024 --json "$R/eval_tutorial.json"
$CLI eval "${models[@]}" --reference "$SRC" --max-tokens 4096 --window 1024 --data /usr/share/common-licenses/GPL-3 \
  --json "$R/eval_gpl3.json"
python3 scripts/uptrain_results.py "$R/eval_tutorial.json" "$R/eval_gpl3.json" --json "$R/uptrain.json" \
  | tee "$R/uptrain_results.md"
