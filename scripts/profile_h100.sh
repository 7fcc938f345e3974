#!/usr/bin/env bash
# Build the recorded tables the replay environment ships, on the lent H100, in resumable steps that
# each stop cleanly before the device's 10-minute command limit. Rerun the same step to resume it;
# the tables live under runs/profiles/ (carried between device calls).
#   scripts/profile_h100.sh stages     # molmoe-1b stage tables + validation of the composition
#   scripts/profile_h100.sh quality    # micro answers and scores, every (request, config)
#   scripts/profile_h100.sh requests   # micro latency, every (request, config) once + repeats
set -uo pipefail
out=runs/profiles
mkdir -p "$out"
cli="python3 -m flexvlm_env.profiles.cli"
minutes=${MINUTES:-3}
case "${1:?step: stages, quality or requests}" in
  stages)
    timeout 300 $cli stages --preset molmoe-1b --weights random --device cuda --out $out/molmoe-1b_h100_stages \
      --no-progress --max-minutes "$minutes"
    timeout 120 $cli validate-stages --preset molmoe-1b --weights random --device cuda \
      --stages $out/molmoe-1b_h100_stages --json-out $out/replay_latency_validation.json --no-progress ;;
  quality)
    timeout $(( ${minutes%.*} * 60 + 120 )) $cli quality --preset micro --device cuda --dtype float32 \
      --out $out/micro_quality --batch-size 1024 --no-progress --max-minutes "$minutes" ;;
  requests)
    timeout $(( ${minutes%.*} * 60 + 120 )) $cli requests --preset micro --device cuda \
      --out $out/micro_h100_requests --no-progress --max-minutes "$minutes" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
