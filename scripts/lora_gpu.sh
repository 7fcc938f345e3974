#!/usr/bin/env bash
# Issue [lora] on a lent 4-GPU machine, inside one 10-minute device command. Tables are the same
# sweep as the shipped micro table (procedural val, 200 requests per family, 140 configs,
# importance mask, float32).
#   BASE=path/to/model.safetensors scripts/lora_gpu.sh [OUT_DIR]               # PLAN=first (default)
#   BASE=path/to/model.safetensors PLAN=anchor scripts/lora_gpu.sh [OUT_DIR]
#   BASE=path/to/model.safetensors PLAN=grid ADAPTER=OUT_DIR/NAME/adapter scripts/lora_gpu.sh [OUT_DIR]
# PLAN=first: three LoRA variants fine-tuned on the full-config-only base (GPUs 0, 2, 3), each
#   followed by its quality table, while GPU 1 records the base's own table.
# PLAN=anchor: four variants with the full-configuration KL anchor (--anchor-coef), one per GPU.
#   Each answers a selection pool (8 configurations of another val pool, --task-seed 1) and the
#   reported pool's full configuration; `select_variant` picks the adapter to read the bars on
#   from the selection pool alone (its rule and scores are written to selection.json).
# PLAN=grid: one adapter's whole grid over the 4 GPUs, split by cost (about 3 minutes on 4 x H200).
# Copy OUT_DIR off the machine as one archive (it holds many table shards).
# Then `python scripts/lora_compare.py --pack NAME=...` for results/lora_summary.json and the figure.
set -uo pipefail
base=${BASE:?set BASE to the full-config-only weights (.safetensors)}
plan=${PLAN:-first}
out=${1:-runs/lora}
budget_s=${BUDGET_S:-555}  # the whole script, inside the device's 10-minute command limit
start=$(date +%s)
mkdir -p "$out"
quality="python3 -m flexvlm_env.profiles.cli quality --device cuda --dtype float32 --batch-size 1024 --no-progress --weights $base"
full="--crops 12 --top-k 8 --active-blocks 16"
left_min() { python3 -c "print(max(0.5, ($budget_s - ($(date +%s) - $start) - 25) / 60))"; }

finetune() {  # GPU NAME [finetune_lora.py arguments...]; fails when no adapter was written
  local gpu=$1 name=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpu python3 scripts/finetune_lora.py --base "$base" --run-dir "$out/$name" --num-workers 12 \
    --max-minutes 4.5 "$@" > "$out/$name.log" 2>&1 || echo "$name: fine-tuning failed" >> "$out/$name.log"
  [ -f "$out/$name/adapter/adapter_model.safetensors" ]
}

first_variant() {  # GPU NAME [finetune_lora.py arguments...]
  local gpu=$1 name=$2
  finetune "$@" || return
  CUDA_VISIBLE_DEVICES=$gpu $quality --adapter "$out/$name/adapter" --out "$out/quality_$name" --max-minutes "$(left_min)" >> "$out/$name.log" 2>&1
}

anchor_variant() {  # GPU NAME [finetune_lora.py arguments...]: fine-tune, then the selection pool and the full config
  local gpu=$1 name=$2
  finetune "$@" || return
  CUDA_VISIBLE_DEVICES=$gpu $quality --adapter "$out/$name/adapter" $selection --out "$out/select_$name" >> "$out/$name.log" 2>&1
  CUDA_VISIBLE_DEVICES=$gpu $quality --adapter "$out/$name/adapter" $full --out "$out/quality_${name}_full" >> "$out/$name.log" 2>&1
}

grid_part() {  # GPU NAME CROPS...: the adapter $ADAPTER's grid at these crops values
  local gpu=$1 name=$2
  shift 2
  for crops in "$@"; do
    CUDA_VISIBLE_DEVICES=$gpu $quality --adapter "$ADAPTER" --crops "$crops" --out "$out/quality_${name}_c$crops" \
      --max-minutes "$(left_min)" >> "$out/grid_gpu$gpu.log" 2>&1
  done
}

case $plan in
  first)
    CUDA_VISIBLE_DEVICES=1 $quality --out "$out/quality_base" --max-minutes "$(left_min)" > "$out/base.log" 2>&1 &
    first_variant 0 r16_decoder --rank 16 --alpha 32 &
    first_variant 2 r16_decoder_vision --rank 16 --alpha 32 --target-modules att_proj attn_out gate wq wk wv wo w1 w2 w3 &
    first_variant 3 r4_decoder --rank 4 --alpha 8 &
    ;;
  anchor)
    # The selection pool: another val pool (--task-seed 1), the four corners of crops x top_k at
    # 8 and 16 blocks (8 configs; the full one among them).
    selection="--task-seed 1 --crops 1 12 --top-k 1 8 --active-blocks 8 16"
    CUDA_VISIBLE_DEVICES=0 $quality $selection --out "$out/select_base" > "$out/base.log" 2>&1 &
    anchor_variant 0 r16_anchor4 --rank 16 --alpha 32 --anchor-coef 4 &
    anchor_variant 1 r16_anchor16 --rank 16 --alpha 32 --anchor-coef 16 &
    anchor_variant 2 r16_anchor64 --rank 16 --alpha 32 --anchor-coef 64 &
    anchor_variant 3 r16_anchor16_pfull40 --rank 16 --alpha 32 --anchor-coef 16 --p-full 0.4 &
    wait
    names=(r16_anchor4 r16_anchor16 r16_anchor64 r16_anchor16_pfull40)
    python3 - "$out" "${names[@]}" <<'PY' || exit 1
import json, sys
from pathlib import Path
from flexvlm_env.experiments.lora import select_variant
from flexvlm_env.profiles.tables import read_table
out, names = Path(sys.argv[1]), sys.argv[2:]
present = [n for n in names if (out / f"select_{n}").exists()]
choice = select_variant({n: read_table(out / f"select_{n}") for n in present}, read_table(out / "select_base"))
(out / "selection.json").write_text(json.dumps(choice, indent=1))
print(json.dumps(choice, indent=1))
PY
    ;;
  grid)
    : "${ADAPTER:?set ADAPTER to the adapter directory whose grid to sweep}"
    name=$(basename "$(dirname "$ADAPTER")")
    # Split by cost (vision tokens grow with crops): about equal work per GPU.
    grid_part 0 "$name" 12 &
    grid_part 1 "$name" 9 1 &
    grid_part 2 "$name" 6 3 &
    grid_part 3 "$name" 4 2 &
    ;;
  *) echo "PLAN=$plan: allowed first, anchor or grid" >&2; exit 2 ;;
esac
wait
tail -n 4 "$out"/*.log
