#!/usr/bin/env bash
# Build the recorded tables the replay environment ships, on the lent GPU (H100 or H200), in resumable steps that
# each stop cleanly before the device's 10-minute command limit. Rerun the same step to resume it;
# the tables live under runs/profiles/ (carried between device calls).
#   [PRESET=micro] scripts/profile_gpu.sh stages  # stage tables + validation of the composition
#   [WEIGHTS=...] scripts/profile_gpu.sh quality  # micro answers and scores, every (request, config) (all visible GPUs)
#   [WEIGHTS=...] scripts/profile_gpu.sh requests # micro latency, every (request, config) once + repeats (all visible GPUs)
# WEIGHTS=path profiles another micro checkpoint than the shipped one (a retrained micro, e.g. at
# 224 px crops, has other token counts: its latency tables must be measured with it).
set -uo pipefail
out=runs/profiles
mkdir -p "$out"
cli="python3 -m flexvlm_env.profiles.cli"
minutes=${MINUTES:-3}
# Tables are named after the card they were measured on (the lent machine may be an H100 or an H200).
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -E 'H100|H200|A100|L40S|L4' | tr 'A-Z' 'a-z')
card=${card:-gpu}
case "${1:?step: stages, quality or requests}" in
  stages)
    # PRESET=micro measures the shipped micro weights (or WEIGHTS); molmoe-1b uses random weights (latency only).
    preset=${PRESET:-molmoe-1b}
    weights=$([ "$preset" = micro ] && echo "${WEIGHTS:+--weights $WEIGHTS}" || echo "--weights random")
    # Host threads as in `requests`: torch's default on a 64-core host (64 threads) inflated micro's
    # host preprocessing in the stage table about 7x over the requests table's (9.1 vs 1.3 ms).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
    timeout 300 $cli stages --preset "$preset" $weights --device cuda --out $out/${preset}_${card}_stages \
      --no-progress --max-minutes "$minutes"
    timeout 120 $cli validate-stages --preset "$preset" $weights --device cuda \
      --stages $out/${preset}_${card}_stages --json-out $out/replay_latency_validation_${preset}_${card}.json --no-progress ;;
  quality)
    # WEIGHTS=path answers with another micro checkpoint (default: the shipped weights). As for
    # requests: one process per visible GPU, each on a disjoint shard; merge with consolidate.
    weights=${WEIGHTS:+--weights $WEIGHTS}
    n=$(nvidia-smi -L | wc -l)
    if [ "$n" -le 1 ]; then
      timeout $(( ${minutes%.*} * 60 + 120 )) $cli quality --preset micro $weights --device cuda --dtype float32 \
        --out $out/micro_quality --batch-size 1024 --cache-gib 32 --no-progress --max-minutes "$minutes"
    else
      for i in $(seq 0 $((n - 1))); do
        CUDA_VISIBLE_DEVICES=$i OMP_NUM_THREADS=4 timeout $(( ${minutes%.*} * 60 + 120 )) $cli quality --preset micro \
          $weights --device cuda --dtype float32 --shard "$i/$n" --out $out/micro_quality_x$n/shard-$i \
          --batch-size 1024 --cache-gib 32 --no-progress --max-minutes "$minutes" > $out/quality-shard-$i.log 2>&1 &
      done
      wait
      tail -n 6 $out/quality-shard-*.log
    fi ;;
  requests)
    weights=${WEIGHTS:+--weights $WEIGHTS}
    # One process per visible GPU, each timing a disjoint shard of the pool (--shard i/n); merge
    # the shards with `flexvlm-profile consolidate`. With one GPU this resumes a single table.
    n=$(nvidia-smi -L | wc -l)
    if [ "$n" -le 1 ]; then
      timeout $(( ${minutes%.*} * 60 + 120 )) $cli requests --preset micro $weights --device cuda \
        --out $out/micro_${card}_requests --no-progress --max-minutes "$minutes"
    else
      for i in $(seq 0 $((n - 1))); do
        CUDA_VISIBLE_DEVICES=$i OMP_NUM_THREADS=4 timeout $(( ${minutes%.*} * 60 + 120 )) $cli requests \
          --preset micro $weights --device cuda --shard "$i/$n" --out $out/micro_${card}_requests_x$n/shard-$i \
          --no-progress --max-minutes "$minutes" > $out/shard-$i.log 2>&1 &
      done
      wait
      tail -n 6 $out/shard-*.log
    fi ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
