#!/usr/bin/env bash
# Issue [lora] on a lent 4-GPU machine, inside one 10-minute device command: three LoRA variants are
# fine-tuned on the full-config-only base (GPUs 0, 2, 3), each followed by its quality table over the
# knob grid, while GPU 1 records the base's own table. Tables are the same sweep as the shipped
# micro table (procedural val, 200 requests per family, 140 configs, importance mask, float32).
#   BASE=path/to/model.safetensors scripts/lora_gpu.sh [OUT_DIR]
# then `flexvlm-profile consolidate OUT/quality_<name>.parquet OUT/quality_<name>` per table, and
# `python scripts/lora_compare.py` for results/lora_summary.json and the frontier figure.
set -uo pipefail
base=${BASE:?set BASE to the full-config-only weights (.safetensors)}
out=${1:-runs/lora}
budget_s=${BUDGET_S:-555}  # the whole script, inside the device's 10-minute command limit
start=$(date +%s)
mkdir -p "$out"
quality="python3 -m flexvlm_env.profiles.cli quality --device cuda --dtype float32 --batch-size 1024 --no-progress --weights $base"
left_min() { python3 -c "print(max(0.5, ($budget_s - ($(date +%s) - $start) - 25) / 60))"; }

variant() {  # GPU NAME [finetune_lora.py arguments...]
  local gpu=$1 name=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpu python3 scripts/finetune_lora.py --base "$base" --run-dir "$out/$name" --num-workers 12 \
    --max-minutes 4.5 "$@" > "$out/$name.log" 2>&1 || { echo "$name: fine-tuning failed" >> "$out/$name.log"; return; }
  [ -f "$out/$name/adapter/adapter_model.safetensors" ] || return
  CUDA_VISIBLE_DEVICES=$gpu $quality --adapter "$out/$name/adapter" --out "$out/quality_$name" --max-minutes "$(left_min)" >> "$out/$name.log" 2>&1
}

CUDA_VISIBLE_DEVICES=1 $quality --out "$out/quality_base" --max-minutes "$(left_min)" > "$out/base.log" 2>&1 &
variant 0 r16_decoder --rank 16 --alpha 32 &
variant 2 r16_decoder_vision --rank 16 --alpha 32 --target-modules att_proj attn_out gate wq wk wv wo w1 w2 w3 &
variant 3 r4_decoder --rank 4 --alpha 8 &
wait
tail -n 4 "$out"/*.log
