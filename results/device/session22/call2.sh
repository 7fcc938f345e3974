# Session 22, call 2 (nvidia-h200-x2, the machine of call 1, still held): finish the sweep, then merge
# the shards into one Parquet file and return it plus the shard directories as one tar (a call
# returns a limited number of files).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
ls runs/profiles/micro_h200_requests_x2/*/ | wc -l
start=$(date +%s)
MINUTES=${MINUTES:-7} bash scripts/profile_gpu.sh requests
echo "sweep wall_s $(( $(date +%s) - start ))"
python3 -m flexvlm_env.profiles.cli consolidate runs/profiles/micro_h200_requests_x2/shard-0 runs/profiles/micro_h200_requests_x2/shard-1 --out "$OUT/micro_h200_requests.parquet"
tar -czf "$OUT/micro_h200_requests_x2_shards.tar.gz" -C runs/profiles micro_h200_requests_x2 shard-0.log shard-1.log
ls -la "$OUT"
