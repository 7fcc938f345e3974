# Session 22, calls 1-3 (nvidia-h200-x2): re-record micro's per-(request, config) H200 latency table
# (micro-h200-measured) with the current engine, one `--shard i/2` process per GPU, resumable.
# Every call returns the shard directories under $OUT; a later call carries them back in
# (runs/profiles/micro_h200_requests_x2) when the machine was not kept between calls.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
git rev-parse HEAD 2>/dev/null || true
ls runs/profiles/micro_h200_requests_x2/*/ 2>/dev/null | head -3
start=$(date +%s)
MINUTES=${MINUTES:-7} bash scripts/profile_gpu.sh requests
echo "sweep wall_s $(( $(date +%s) - start ))"
mkdir -p "$OUT/micro_h200_requests_x2" && cp -r runs/profiles/micro_h200_requests_x2/. "$OUT/micro_h200_requests_x2/"
cp runs/profiles/shard-*.log "$OUT/" 2>/dev/null
du -sh "$OUT"
