# Session 22, call 3 (nvidia-h200): re-measure micro's H200 stage table (latency="micro-h200") with the
# current engine and validate its composition against end-to-end runs on the same host.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
PRESET=micro MINUTES=4 bash scripts/profile_gpu.sh stages 2>&1 | tail -n 20
echo "stages + validation wall_s $(( $(date +%s) - start ))"
python3 -m flexvlm_env.profiles.cli consolidate "$OUT/micro_h200_stages.parquet" runs/profiles/micro_h200_stages
cp runs/profiles/replay_latency_validation_micro_h200.json "$OUT/" 2>/dev/null
tar -czf "$OUT/micro_h200_stages_dir.tar.gz" -C runs/profiles micro_h200_stages
ls -la "$OUT"
