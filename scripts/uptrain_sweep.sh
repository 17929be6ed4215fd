#!/usr/bin/env bash
# The uptraining table (docs/guides/uptraining.md, docs/results.md): SmolLM2-135M-Instruct converted with today's
# default MLA -68.75 % KV and with GQA `fit` MQA (-66.7 %), uptrained on the Python *library* docs (<= 96k tokens
# per model: layerwise, distill, and layerwise then distill; MQA: layerwise), evaluated on the held-out *tutorial* (16K tokens) and on GPL-3 (4K tokens, unlike either).
# A step whose output folder exists is skipped, so a killed sweep resumes where it stopped.
#   bash scripts/uptrain_sweep.sh [WORKDIR]     then: python3 scripts/tables.py --add WORKDIR/uptrain.json
#                                                     results/uptrain_smollm2.json
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/uptrain-sweep}
mkdir -p "$R"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
LIB=/usr/share/doc/python3.11/html/_sources/library   # training + calibration text; eval: the tutorial, GPL-3
SRC=$(python3 -m hf_attn_swap example-model smollm2)
CLI="python3 -m hf_attn_swap"

[ -f "$R/mla-0.3125/conversion.json" ] || $CLI convert "$SRC" "$R/mla-0.3125" --to mla --kv-budget 0.3125 --overwrite
[ -f "$R/mqa-fit/conversion.json" ] || $CLI convert "$SRC" "$R/mqa-fit" --to gqa --num-kv-heads 1 --method fit \
  --calibration-data $LIB --overwrite

up() {  # NAME MODEL [uptrain flags...]
  local name=$1 model=$2
  shift 2
  [ -f "$R/$name/conversion.json" ] && return 0  # done in an earlier run of this script
  $CLI uptrain "$model" "$R/$name" --data $LIB --block-size 512 --save-steps 32 --no-progress --overwrite \
    --json "$R/$name.json" "$@"
}
FREEZE="--freeze kv_a_proj_with_mqa"  # the deepseek_v3 export's scaled latent rows (guide: Frozen parameters)
up mla-0.3125-layerwise-32k "$R/mla-0.3125" --mode layerwise --max-tokens 32768 $FREEZE
up mla-0.3125-distill-32k "$R/mla-0.3125" --mode distill --max-tokens 32768 $FREEZE
up mla-0.3125-layerwise-64k "$R/mla-0.3125" --mode layerwise --max-tokens 65536 $FREEZE
up mla-0.3125-layerwise-64k-distill-32k "$R/mla-0.3125-layerwise-64k" --mode distill --max-tokens 32768 \
  --teacher "$SRC" $FREEZE
up mqa-fit-layerwise-32k "$R/mqa-fit" --mode layerwise --max-tokens 32768 --learning-rate 1e-4

models=(original="$SRC")
for name in mla-0.3125 mla-0.3125-layerwise-32k mla-0.3125-distill-32k mla-0.3125-layerwise-64k \
  mla-0.3125-layerwise-64k-distill-32k mqa-fit mqa-fit-layerwise-32k; do
  models+=("$name=$R/$name")
done
$CLI eval "${models[@]}" --reference "$SRC" --max-tokens 16384 --window 1024 --json "$R/eval_tutorial.json"
$CLI eval "${models[@]}" --reference "$SRC" --max-tokens 4096 --window 1024 --data /usr/share/common-licenses/GPL-3 \
  --json "$R/eval_gpl3.json"
python3 scripts/uptrain_results.py "$R/eval_tutorial.json" "$R/eval_gpl3.json" --json "$R/uptrain.json" \
  | tee "$R/uptrain_results.md"
