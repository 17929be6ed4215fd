#!/usr/bin/env bash
# The README's uptraining table: SmolLM2-135M-Instruct converted to MQA (mean and fit) and to MLA (-68.75% KV),
# uptrained with each recipe mode on the Python library docs, evaluated on the held-out tutorial.
#   bash scripts/uptrain_sweep.sh [WORKDIR]      (~45 min on 2 CPU cores; every number lands in WORKDIR)
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/uptrain-sweep}
mkdir -p "$R"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
LIB=/usr/share/doc/python3.11/html/_sources/library   # training + calibration text; eval: the tutorial
SRC=$(python3 -m hf_attn_swap example-model smollm2)
CLI="python3 -m hf_attn_swap"

$CLI convert "$SRC" "$R/mqa-mean" --to gqa --num-kv-heads 1 --overwrite
$CLI convert "$SRC" "$R/mqa-fit" --to gqa --num-kv-heads 1 --method fit --calibration-data $LIB --overwrite
$CLI convert "$SRC" "$R/mla-r72-d48" --to mla --kv-lora-rank 72 --rope-dim 48 --rope-selection high --overwrite  # high + pca on $LIB (the table's method)

up() {  # NAME MODEL [uptrain flags...]
  local name=$1 model=$2
  shift 2
  $CLI uptrain "$model" "$R/$name" --data $LIB --block-size 512 --save-steps 32 --no-progress --overwrite \
    --json "$R/$name.json" "$@"
}
for mode in layerwise distill lora full; do up mqa-$mode-32k "$R/mqa-mean" --mode $mode --max-tokens 32768; done
up mqa-layerwise-32k-distill-16k "$R/mqa-layerwise-32k" --mode distill --max-tokens 16384 --teacher "$SRC"
up mqa-fit-layerwise-32k "$R/mqa-fit" --mode layerwise --max-tokens 32768
up mqa-fit-layerwise-32k-lr1e-4 "$R/mqa-fit" --mode layerwise --max-tokens 32768 --learning-rate 1e-4
FREEZE="--freeze kv_a_proj_with_mqa"  # the deepseek_v3 export's scaled latent rows (README: Frozen parameters)
up mla-layerwise-32k "$R/mla-r72-d48" --mode layerwise --max-tokens 32768 $FREEZE
up mla-distill-32k "$R/mla-r72-d48" --mode distill --max-tokens 32768 $FREEZE
up mla-layerwise-32k-distill-16k "$R/mla-layerwise-32k" --mode distill --max-tokens 16384 --teacher "$SRC" $FREEZE

models=(original="$SRC" mqa-mean="$R/mqa-mean" mqa-fit="$R/mqa-fit" mla="$R/mla-r72-d48")
for name in mqa-layerwise-32k mqa-distill-32k mqa-lora-32k mqa-full-32k mqa-layerwise-32k-distill-16k \
  mqa-fit-layerwise-32k mqa-fit-layerwise-32k-lr1e-4 mla-layerwise-32k mla-distill-32k mla-layerwise-32k-distill-16k; do
  models+=("$name=$R/$name")
done
$CLI eval "${models[@]}" --reference "$SRC" --max-tokens 16384 --window 1024 \
  --tasks hfas_text_mc hfas_text_lastword --task-limit 100 \
  --json "$R/uptrain_eval.json" --markdown "$R/uptrain_eval.md" --plots "$R/plots"
python3 scripts/uptrain_results.py "$R/uptrain_eval.json" | tee "$R/uptrain_results.md"
