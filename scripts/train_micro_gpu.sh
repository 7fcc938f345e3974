#!/usr/bin/env bash
# The micro training round on a lent GPU machine, in steps that each fit the device's 10-minute
# command limit. The run lives in RUN (default /tmp/micro224, kept by the machine while it is held);
# rerunning a step resumes it. Every step copies what must survive into OUT_DIR (default $OUT).
#   scripts/train_micro_gpu.sh reader  # reading pretraining of the vision tower on GPU 0, exported to $RUN/reader.safetensors
#   scripts/train_micro_gpu.sh train   # a resumable training chunk over every visible GPU (torchrun)
#   scripts/train_micro_gpu.sh eval    # results/micro_quality.json-style bars of the exported weights, on GPU
# Training arguments after the step go to train_micro.py, e.g.
#   scripts/train_micro_gpu.sh train --crop-px 224 --init-from flexvlm_env/assets/micro/model.safetensors \
#       --seed 11 --total-steps 4000 --focus-steps 1200 --decay-frac 0.3
# (the arguments that define the run must be repeated unchanged on every chunk; train_micro.py refuses
# a resume that changes them). MINUTES bounds a training or reader chunk (default 8.3).
# The reading round: `reader --fresh-vision` (arguments go to pretrain_reader.py), then
# `train --init-from $RUN/reader.safetensors --crop-px 224 --focus-steps ... --focus-transcribe-weight ...`,
# then scripts/reading_check.py on the run's transfer/ state before training at length.
set -uo pipefail
run=${RUN:-/tmp/micro224}
out=${OUT_DIR:-${OUT:?set OUT_DIR}}
mkdir -p "$run" "$out"
gpus=$(nvidia-smi -L | wc -l)
case "${1:?step: train or eval}" in
  train)
    shift
    timeout 585 torchrun --standalone --nproc-per-node "$gpus" scripts/train_micro.py --run-dir "$run" \
      --export-dir "$run/export" --max-minutes "${MINUTES:-8.3}" --checkpoint-minutes 2 "$@" 2>&1 | tail -n 60
    # The log and the weights-only state (fp32 shards of < 15 MB) move the run to another machine.
    cp "$run/log.jsonl" "$out/" 2>/dev/null
    [ -d "$run/transfer" ] && cp "$run"/transfer/* "$out/"
    [ -f "$run/export/model.safetensors" ] && cp "$run"/export/model.* "$out/"
    true ;;
  reader)
    shift
    # GPU (default 0) and WORKERS (default: CPU count - 2) let several readers share one host.
    CUDA_VISIBLE_DEVICES=${GPU:-0} timeout 585 python3 scripts/pretrain_reader.py --run-dir "$run/reader" \
      --out "$run/reader.safetensors" --max-minutes "${MINUTES:-8.3}" --num-workers "${WORKERS:-$(( $(nproc) - 2 ))}" \
      "$@" 2>&1 | tail -n 40
    # A chunk that stopped on time exports what it has: rerun at the step reached (nothing left to train).
    step=$(python3 -c "import json; print(json.load(open('$run/reader/checkpoint/state.json'))['progress']['step'])")
    [ -f "$run/reader.safetensors" ] || CUDA_VISIBLE_DEVICES=${GPU:-0} python3 scripts/pretrain_reader.py \
      --run-dir "$run/reader" --out "$run/reader.safetensors" "$@" --steps "$step" 2>&1 | tail -n 1  # the last --steps wins
    cp "$run/reader/log.jsonl" "$out/reader_log.jsonl" ;;
  eval)
    # One evaluation per GPU at once: the quality table on GPU 0 (200 requests per family), the
    # 140-configuration adaptivity grid with GPU latency on GPU 1 (or after it, with one GPU).
    weights="$run/export/model.safetensors"
    common="--weights $weights --device cuda --batch-size 600"
    CUDA_VISIBLE_DEVICES=0 timeout 560 python3 scripts/eval_micro.py $common --out "$out/micro_quality_table.json" \
      --grid-requests-per-family 1 --latency-requests 1 --latency-repeats 1 > "$out/eval_table.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=$((gpus - 1)) timeout 560 python3 scripts/eval_micro.py $common --out "$out/micro_quality_grid.json" \
      --requests-per-family 40 --grid-requests-per-family 40 --latency-repeats 1 > "$out/eval_grid.log" 2>&1 &
    wait
    tail -n 30 "$out"/eval_*.log ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
